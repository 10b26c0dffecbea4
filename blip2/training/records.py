"""Training records from any supported input, as Ray Data (or a plain reader) batches them: validated
(every record kept or skipped with a reason, never fatal), decoded and resized once.

Ray Data runs these functions in its task workers, which import this module to run them: it needs numpy
and PIL only, never torch or transformers (a fresh worker process would spend seconds importing them to
decode JPEGs); ``tests/blip2/test_light_imports.py`` keeps it so. Model batches are
:mod:`blip2.training.data`'s.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from blip2.capfilt.config import ValidationConfig
from blip2.capfilt.records import CAPTION_ISSUES, check_caption
from blip2.images import REASONS as IMAGE_REASONS
from blip2.images import ImageError, load_image

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")  # WebDataset extensions, then Parquet's column
TEXT_COLUMNS = ("captions", "txt", "text", "caption")  # CapFilt's kept list first, then single alt-texts
CAPTIONS_JSON = "captions_json"  # a list of captions as JSON text (the feature cache's Parquet-safe form)


def _column(batch: Mapping[str, Any], names: Sequence[str], what: str) -> Any:
    for name in names:
        if name in batch:
            return batch[name]
    raise KeyError(f"no {what} column in the training data: expected one of {', '.join(names)}, "
                   f"got {', '.join(batch) or 'none'}")


def batch_images(batch: Mapping[str, Any], image_size: int) -> np.ndarray:
    """uint8 RGB images (B, image_size, image_size, 3) from a batch whose image column holds encoded bytes
    (decoded by :func:`blip2.images.load_image`, the decoder CapFilt and Serve use) or decoded arrays;
    other sizes are resized. Records reach here through :func:`training_records`, which has already
    skipped every image that does not decode, so an error here is a bug, not bad data."""
    column = _column(batch, IMAGE_COLUMNS, "image")
    if isinstance(column, np.ndarray) and column.dtype == np.uint8 and column.shape[1:] == (image_size, image_size, 3):
        return column  # decoded and resized already (training_records, in Ray Data)
    images = []
    for value in column:
        if isinstance(value, (bytes, bytearray, memoryview)):
            image = load_image(bytes(value), max_pixels=LIMITS.max_pixels, max_side=LIMITS.max_side)
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BICUBIC)
            array = np.asarray(image)
        else:
            array = np.asarray(value, dtype=np.uint8)
            if array.shape[:2] != (image_size, image_size):
                array = np.asarray(Image.fromarray(array).convert("RGB").resize((image_size, image_size),
                                                                               Image.BICUBIC))
        images.append(array)
    return np.stack(images)


def _texts(value: Any) -> list[str]:
    if value is None:
        return []
    texts = [value] if isinstance(value, str) else [str(v) for v in value]
    return [t for t in texts if t.strip()]


def _candidates(batch: Mapping[str, Any]) -> list[list[str]]:
    """Every record's usable captions (possibly none): CapFilt's kept list, or the one alt-text."""
    if CAPTIONS_JSON in batch:
        return [_texts(json.loads(v)) for v in batch[CAPTIONS_JSON]]
    return [_texts(v) for v in _column(batch, TEXT_COLUMNS, "caption")]


def json_captions(batch: Mapping[str, Any]) -> list[list[str]]:
    """Every record's candidate captions from the ``captions_json`` column (empty for a mixture's file
    examples, which carry an ``example_json`` instead)."""
    return [_texts(json.loads(v)) for v in batch[CAPTIONS_JSON]]


def caption_choices(batch: Mapping[str, Any]) -> list[list[str]]:
    """Every record's candidate captions: CapFilt's kept list, or the one alt-text. Records without any
    are removed before training (:func:`training_records`); here they are an error."""
    choices = _candidates(batch)
    if not all(choices):
        raise ValueError("a training record has no caption (filter the data with training_records)")
    return choices


# ---------------------------------------------------------------------------------------------------
# Validation: every record of a web crawl is either kept or skipped with a reason, never fatal.

LIMITS = ValidationConfig()  # CapFilt's limits on untrusted images and captions, the same for training
SKIP_REASONS = ("missing_image", *IMAGE_REASONS, *CAPTION_ISSUES)


def _missing(value: Any) -> bool:
    """A member or field a record does not have: Ray's WebDataset reader leaves NaN, Parquet None."""
    return value is None or (isinstance(value, float) and value != value)


def _first_present(batch: Mapping[str, Any], names: Sequence[str], size: int) -> list[Any]:
    """Per record, the first of ``names`` it has (a shard may mix ``.jpg`` and ``.png`` members)."""
    columns = [batch[name] for name in names if name in batch]
    return [next((column[i] for column in columns if not _missing(column[i])), None) for i in range(size)]


def _batch_size(batch: Mapping[str, Any]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def _decode(value: Any) -> tuple[np.ndarray | None, str]:
    """A record's image decoded to uint8 RGB (H, W, 3) and "", or None and the reason it is skipped (a
    :data:`SKIP_REASONS` entry). Validating an image means decoding it, so the decoded pixels are kept:
    training then never decodes again on the step's critical path."""
    if value is None:
        return None, "missing_image"
    if isinstance(value, np.ndarray) and value.dtype != object:  # already decoded
        ok = value.ndim == 3 and value.shape[-1] == 3
        return (value.astype(np.uint8, copy=False), "") if ok else (None, "unsupported_mode")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return None, "not_an_image"
    if len(value) > LIMITS.max_image_bytes:
        return None, "too_large"
    try:
        return np.asarray(load_image(bytes(value), max_pixels=LIMITS.max_pixels, max_side=LIMITS.max_side)), ""
    except ImageError as error:
        return None, error.reason


def _captions(value: Any) -> tuple[list[str], str]:
    """A record's usable captions, cleaned as CapFilt cleans them (NFC, control characters such as NUL
    removed), and the caption issue when there is none."""
    if _missing(value):
        return [], "missing_caption"
    values = [value] if isinstance(value, (str, bytes, bytearray, memoryview)) else list(value)
    texts, issue = [], "missing_caption"
    for raw in values:
        text, problem = check_caption(raw, LIMITS.max_caption_chars)
        if text:
            texts.append(text)
        else:
            issue = problem or issue
    return texts, ("" if texts else issue)


def _image_problem(value: Any) -> str:
    """"" for a usable image, else the reason it is skipped (a :data:`SKIP_REASONS` entry)."""
    return _decode(value)[1]


def validate_records(batch: Mapping[str, Any]) -> tuple[list[Any], list[list[str]], list[str]]:
    """Each record's image (decoded to uint8 RGB; None when skipped), its usable captions and why it is
    skipped ("" when kept)."""
    size = _batch_size(batch)
    images = _first_present(batch, IMAGE_COLUMNS, size)
    if CAPTIONS_JSON in batch:
        choices = [(_texts(json.loads(v)), "") for v in batch[CAPTIONS_JSON]]
        choices = [(texts, "" if texts else "missing_caption") for texts, _ in choices]
    else:
        choices = [_captions(v) for v in _first_present(batch, TEXT_COLUMNS, size)]
    decoded, reasons = [], []
    for image, (_, issue) in zip(images, choices, strict=True):
        array, problem = _decode(image)
        decoded.append(array)
        reasons.append(problem or issue)
    return decoded, [texts for texts, _ in choices], reasons


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> (size, size, 3), bicubic (the image processors' resample)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.BICUBIC))


def training_records(batch: Mapping[str, Any], image_size: int | None = None) -> dict[str, np.ndarray]:
    """A batch of any supported layout -> the two columns training reads: ``image`` (decoded uint8 RGB: one
    (B, H, W, 3) array when the images share a size, else an object array of (H, W, 3) arrays) and
    ``captions_json`` (each record's candidate captions as JSON text); with ``image_size``, every image is
    resized to it here (decoded and resized once, in Ray Data, not on every step of the training loop),
    without the records that cannot be trained on: an image that is missing or does not decode, or no
    usable caption (:func:`skip_counts` says how many of each).

    Every source of a training mix is brought to these columns, so that several corpora (a clean set and
    CapFilt's output of a web crawl, as BLIP bootstraps) are read as one dataset."""
    images, choices, reasons = validate_records(batch)
    keep = [i for i, reason in enumerate(reasons) if not reason]
    kept = [_resized(images[i], image_size) if image_size else images[i] for i in keep]
    if kept and len({image.shape for image in kept}) == 1:  # images of one size: one (B, H, W, 3) array
        kept_images = np.stack(kept)
    elif not kept and image_size:  # a block with nothing kept keeps the tensor type the other blocks have
        kept_images = np.empty((0, image_size, image_size, 3), dtype=np.uint8)
    else:
        kept_images = np.empty(len(kept), dtype=object)
        for i, image in enumerate(kept):
            kept_images[i] = image
    return {"image": kept_images,
            CAPTIONS_JSON: np.array([json.dumps(choices[i]) for i in keep], dtype=object)}


def skip_counts(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """How many records of ``batch`` are kept and how many are skipped for each reason, as a small batch
    (``reason``, ``count``; "kept" for the kept ones) that is summed over a dataset."""
    return _tally(validate_records(batch)[2])


def _tally(reasons: Sequence[str]) -> dict[str, np.ndarray]:
    counts = Counter(reason or "kept" for reason in reasons)
    return {"reason": np.array(list(counts), dtype=object), "count": np.array(list(counts.values()), dtype=np.int64)}


# One pass instead of two: the counting pass and the training records' preparation each decode every image,
# so a job that keeps its prepared records in memory validates, decodes and resizes once, counts the kept
# and skipped records from that pass's ``reason`` column, then drops the skipped ones.
REASON = "reason"


def validated_records(batch: Mapping[str, Any], image_size: int) -> dict[str, np.ndarray]:
    """Every record of ``batch``, kept or not: ``image`` (B, image_size, image_size, 3) uint8, decoded and
    resized (zeros for a skipped record), ``captions_json`` and ``reason`` ("" when kept, else why it is
    skipped). :func:`kept_records` then drops the skipped ones, :func:`reason_counts` counts them."""
    images, choices, reasons = validate_records(batch)
    blank = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    arrays = [blank if reason else _resized(image, image_size) for image, reason in zip(images, reasons, strict=True)]
    return {"image": np.stack(arrays) if arrays else np.empty((0, image_size, image_size, 3), dtype=np.uint8),
            CAPTIONS_JSON: np.array([json.dumps(texts) for texts in choices], dtype=object),
            REASON: np.array(reasons, dtype=object)}


def kept_records(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """:func:`validated_records`' output without its skipped records and ``reason`` column: the columns
    :func:`training_records` gives."""
    keep = np.asarray([not reason for reason in batch[REASON]], dtype=bool)
    return {name: np.asarray(column)[keep] for name, column in batch.items() if name != REASON}


def reason_counts(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """:func:`skip_counts` of :func:`validated_records`' output (reads its ``reason`` column only)."""
    return _tally(list(batch[REASON]))

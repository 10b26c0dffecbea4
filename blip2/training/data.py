"""From records (as Ray Data or a plain reader yields them) to model batches."""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from blip2.backbones.vision import pixel_values
from blip2.toyworld.text import parse_attributes
from blip2.toyworld.world import ATTRIBUTES


def match_ids(texts: Sequence[str]) -> torch.Tensor:
    """An id per caption such that captions known to describe the same thing share it, (B,) int64.

    ITC must not push such pairs apart (LAVIS does the same with image ids). A caption is keyed by the
    attributes it states when it states all four (so every phrasing of "a small red circle on the
    left" matches), otherwise by its normalised text. Read from the text alone, never from labels."""
    keys = []
    for text in texts:
        stated = parse_attributes(text)
        key = "|".join(stated[name] for name in ATTRIBUTES) if len(stated) == len(ATTRIBUTES) else \
            " ".join(text.lower().split())
        keys.append(zlib.crc32(key.encode()))
    return torch.tensor(keys, dtype=torch.int64)


def stage1_text_inputs(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                       max_length: int) -> dict[str, torch.Tensor]:
    """Captions -> ``input_ids`` and ``attention_mask`` (B, max_length: padded to a fixed length, since ITM
    gathers them across workers), and ``ids`` (B,) from :func:`match_ids`."""
    text = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt")
    return {"input_ids": text.input_ids, "attention_mask": text.attention_mask, "ids": match_ids(texts)}


def stage1_batch(images: np.ndarray | Sequence[np.ndarray], texts: Sequence[str],
                 tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, torch.Tensor]:
    """uint8 images (B, H, W, 3) and captions -> ``pixel_values`` (B, 3, H, W) and
    :func:`stage1_text_inputs`."""
    return {"pixel_values": pixel_values(np.stack(list(images))), **stage1_text_inputs(texts, tokenizer, max_length)}


# ---------------------------------------------------------------------------------------------------
# Training records from any of the supported inputs, as Ray Data (or a plain reader) batches them.

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
    """uint8 RGB images (B, image_size, image_size, 3) from a batch whose image column holds decoded
    arrays (Ray Data's WebDataset reader decodes) or encoded bytes (Parquet); other sizes are resized."""
    images = []
    for value in _column(batch, IMAGE_COLUMNS, "image"):
        if isinstance(value, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(value))) as decoded:
                image = decoded.convert("RGB")
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


def caption_choices(batch: Mapping[str, Any]) -> list[list[str]]:
    """Every record's candidate captions: CapFilt's kept list, or the one alt-text. Records without any
    are removed before training (:func:`training_records`); here they are an error."""
    choices = _candidates(batch)
    if not all(choices):
        raise ValueError("a training record has no caption (filter the data with training_records)")
    return choices


def training_records(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A batch of any supported layout -> the two columns training reads: ``image`` (as it came: encoded
    bytes or decoded uint8 arrays) and ``captions_json`` (each record's candidate captions as JSON text),
    without the records that have no usable caption.

    Every source of a training mix is brought to these columns, so that several corpora (a clean set and
    CapFilt's output of a web crawl, as BLIP bootstraps) are read as one dataset."""
    choices = _candidates(batch)
    keep = np.array([bool(texts) for texts in choices], dtype=bool)
    images = _column(batch, IMAGE_COLUMNS, "image")
    if isinstance(images, np.ndarray) and images.dtype != object:  # decoded images of one size, (B, H, W, 3)
        kept_images = images[keep]
    else:  # encoded bytes (or arrays of differing sizes), one object each
        kept_images = np.empty(int(keep.sum()), dtype=object)
        kept_images[:] = [value for value, k in zip(images, keep, strict=True) if k]
    return {"image": kept_images,
            CAPTIONS_JSON: np.array([json.dumps(texts) for texts in choices if texts], dtype=object)}


def sample_captions(choices: Sequence[Sequence[str]], rng: np.random.Generator) -> list[str]:
    """One caption per record, uniformly among its candidates (BLIP-2 samples one of its top two)."""
    return [texts[int(rng.integers(len(texts)))] if len(texts) > 1 else texts[0] for texts in choices]


def task_mixture(sizes: Mapping[str, int]) -> dict[str, float]:
    """InstructBLIP's dataset balancing: each task's sampling probability is proportional to the square
    root of its size, so small tasks are not drowned and large ones not over-fitted. Size 0: never."""
    roots = {task: float(np.sqrt(size)) for task, size in sizes.items() if size > 0}
    if not roots:
        raise ValueError("no task has any examples")
    total = sum(roots.values())
    return {task: root / total for task, root in roots.items()}

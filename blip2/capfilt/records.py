"""One raw record in, one row out: decoded and validated, or rejected with a reason.

Image problems reject the record (there is nothing to caption). Caption problems — missing, empty,
overlong, not UTF-8 — either drop the web caption and keep the image, which may still earn synthetic
captions (``bad_caption="drop"``, the default: that is what CapFilt is for), or reject the record
(``bad_caption="reject"``). Either way the row's ``caption_issue`` records it.

The CapFilt job's first stage runs :func:`decode_shards` in Ray Data's task workers, which import this
module to run it: numpy and PIL only, never torch or transformers (seconds of imports in every fresh worker
process, to decode JPEGs).
"""

from __future__ import annotations

import io
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from blip2.capfilt.config import InputConfig, ValidationConfig
from blip2.config import from_dict
from blip2.capfilt.readers import RawRecord, Shard, read_shard
from blip2.images import ImageError, load_image

OK, REJECTED = "ok", "rejected"
CAPTION_ISSUES = ("missing_caption", "empty_caption", "overlong_caption", "non_utf8_caption")
READER_REASONS = ("missing_image", "missing_file", "unreadable_shard", "duplicate_key")

# Formats/modes whose original bytes any decoder reads as the same RGB image; anything else is
# re-encoded (PNG of the normalised RGB image) so readers of kept/ never meet CMYK or 16-bit data.
_PORTABLE_FORMATS = {"JPEG", "PNG", "WEBP"}
_PORTABLE_MODES = {"RGB", "L"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check_caption(value: str | bytes | None, max_chars: int) -> tuple[str | None, str | None]:
    """(normalised caption, None) or (None, issue). Normalisation: NFC, control characters removed,
    whitespace runs collapsed. Text holding U+FFFD was mis-decoded upstream: counted as non-UTF-8."""
    if value is None:
        return None, "missing_caption"
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8_caption"
    if not isinstance(value, str):
        return None, "missing_caption"
    if "\ufffd" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        return None, "non_utf8_caption"
    text = " ".join(_CONTROL.sub(" ", unicodedata.normalize("NFC", value)).split())
    if not text:
        return None, "empty_caption"
    if len(text) > max_chars:
        return None, "overlong_caption"
    return text, None


@dataclass
class Row:
    """A decoded record. ``pixels`` is (S, S, 3) uint8, zeros when rejected; ``image`` the bytes to
    write to kept/ (None in reference mode or when rejected)."""

    shard: str
    index: int
    key: str
    image_ref: str
    status: str  # OK or REJECTED
    reason: str
    detail: str
    web_text: str | None
    caption_issue: str
    pixels: np.ndarray
    image: bytes | None
    ground_truth: bool | None


def decode_record(record: RawRecord, shard: str, validation: ValidationConfig, image_size: int,
                  keep_bytes: bool = True, seen_keys: set[str] | None = None) -> Row:
    """Validate and decode one record. ``seen_keys`` (per shard) turns repeated keys into rejections."""
    blank = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    key = record.key or f"{shard}-{record.index:06d}"

    def reject(reason: str, detail: str, web_text: str | None = None, issue: str = "") -> Row:
        return Row(shard, record.index, key, record.image_ref, REJECTED, reason, detail, web_text, issue, blank,
                   None, record.ground_truth)

    web_text, issue = check_caption(record.text, validation.max_caption_chars)
    if record.error:
        return reject(record.error, record.detail, web_text, issue or "")
    if seen_keys is not None:
        if key in seen_keys:
            return reject("duplicate_key", f"key {key!r} already seen in shard {shard}", web_text, issue or "")
        seen_keys.add(key)
    if record.image is None or len(record.image) == 0:
        detail = "the image is empty (0 bytes)" if record.image is not None else "no image"
        return reject("empty" if record.image is not None else "missing_image", detail, web_text, issue or "")
    if len(record.image) > validation.max_image_bytes:
        return reject("too_large", f"{len(record.image):,} bytes > {validation.max_image_bytes:,}", web_text,
                      issue or "")
    try:
        image = load_image(record.image, max_pixels=validation.max_pixels, max_side=validation.max_side)
    except ImageError as error:
        return reject(error.reason, str(error), web_text, issue or "")
    if issue and validation.bad_caption == "reject":
        return reject(issue, f"web caption rejected: {issue.replace('_', ' ')}", None, issue)
    pixels = np.asarray(image.resize((image_size, image_size), Image.BICUBIC) if image.size != (image_size,) * 2
                        else image, dtype=np.uint8)
    return Row(shard, record.index, key, record.image_ref, OK, "", "", web_text, issue or "", pixels,
               _output_bytes(record.image, image) if keep_bytes else None, record.ground_truth)


def _output_bytes(original: bytes, decoded: Image.Image) -> bytes:
    with Image.open(io.BytesIO(original)) as header:  # header only: format and mode of the source
        portable = header.format in _PORTABLE_FORMATS and header.mode in _PORTABLE_MODES
    if portable:
        return bytes(original)
    buffer = io.BytesIO()
    decoded.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# A shard as batches of rows: what the decode stage emits.

END = "_end"  # status of the one row that closes a shard; its ``index`` is the shard's record count
ROW_COLUMNS = ("shard", "index", "key", "image_ref", "status", "reason", "detail", "web_text", "caption_issue",
               "pixels", "image", "ground_truth")


def rows_to_batch(rows: list[Row], image_size: int) -> dict[str, np.ndarray]:
    """Columns of equal length. No column holds None: a batch whose values are all None would get a
    different Arrow type than its neighbours and Ray Data could not concatenate them. So a missing web
    caption travels as "", a missing image as b"", and ground truth as int8 (-1 unknown, 0, 1)."""
    def objects(values: list) -> np.ndarray:
        column = np.empty(len(values), dtype=object)
        column[:] = values
        return column

    return {
        "shard": objects([r.shard for r in rows]), "index": np.array([r.index for r in rows], dtype=np.int64),
        "key": objects([r.key for r in rows]), "image_ref": objects([r.image_ref for r in rows]),
        "status": objects([r.status for r in rows]), "reason": objects([r.reason for r in rows]),
        "detail": objects([r.detail for r in rows]), "web_text": objects([r.web_text or "" for r in rows]),
        "caption_issue": objects([r.caption_issue for r in rows]),
        "pixels": np.stack([r.pixels for r in rows]) if rows else np.zeros((0, image_size, image_size, 3), np.uint8),
        "image": objects([r.image or b"" for r in rows]),
        "ground_truth": np.array([-1 if r.ground_truth is None else int(r.ground_truth) for r in rows], dtype=np.int8),
    }


def end_row(shard: str, count: int, image_size: int) -> Row:
    return Row(shard, count, "", "", END, "", "", None, "", np.zeros((image_size, image_size, 3), np.uint8), None, None)


def shard_batches(shard: Shard, input_config: InputConfig, validation: ValidationConfig, image_size: int,
                  keep_bytes: bool, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Read, decode and validate every record of ``shard``; the last batch ends with the shard's END row,
    so a consumer that sees rows out of order still knows when it has all of them."""
    rows: list[Row] = []
    seen: set[str] = set()
    count = 0
    for record in read_shard(shard, input_config):
        rows.append(decode_record(record, shard.name, validation, image_size, keep_bytes, seen))
        count += 1
        if len(rows) == batch_size:
            yield rows_to_batch(rows, image_size)
            rows = []
    rows.append(end_row(shard.name, count, image_size))
    yield rows_to_batch(rows, image_size)


def decode_shards(batch: dict[str, np.ndarray], input_config: dict, validation: dict, image_size: int,
                  keep_bytes: bool, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF (a CPU task): a batch of shard descriptions (:class:`Shard` fields, one row per shard)
    -> :func:`shard_batches` of each; the configs come as dicts (``to_dict``), as Ray passes them."""
    inputs, limits = from_dict(InputConfig, input_config), from_dict(ValidationConfig, validation)
    for i in range(len(batch["name"])):
        shard = Shard(**{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()})
        yield from shard_batches(shard, inputs, limits, image_size, keep_bytes, batch_size)

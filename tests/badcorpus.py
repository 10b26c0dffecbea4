"""A corpus of every kind of bad record, in all three input formats: what the tests feed CapFilt and
training to show that each is rejected (skipped) with its reason or normalised, and that none stops the job.

Each record states what CapFilt should do with it (``expect``): a rejection reason, ``"ok"`` (a valid
image, possibly normalised from CMYK / 16-bit / RGBA / palette / greyscale, or a caption cleaned of
control characters such as NUL), or a caption issue that drops the web caption but keeps the image.
Training, which has no synthetic captions to fall back on, skips a record with a caption issue, counted
under that issue: for training, every ``expect`` but ``"ok"`` is the reason the record is skipped.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from blip2.capfilt.readers import write_coco


@dataclass(frozen=True)
class BadRecord:
    key: str
    image: bytes | None  # None: the record has no image member / field
    text: bytes | None  # raw alt-text bytes; None: no caption field
    expect: str  # a rejection reason, "ok", or a caption issue (the record stays valid)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def bad_records(good_jpeg: bytes, good_caption: str) -> list[BadRecord]:
    """One record of each kind, around one good image and its right caption."""
    rng = np.random.default_rng(0)
    noisy = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=95)
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[16:48, 16:48] = (200, 30, 30, 255)
    palette = Image.new("RGB", (64, 64), (30, 30, 200)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    caption = good_caption.encode()
    return [
        BadRecord("good", good_jpeg, caption, "ok"),
        BadRecord("truncated_jpeg", noisy[: len(noisy) // 2], caption, "truncated"),
        BadRecord("zero_bytes", b"", caption, "empty"),
        BadRecord("not_an_image", b"<html><body>404 Not Found</body></html>", caption, "not_an_image"),
        BadRecord("decompression_bomb", _encode(Image.new("1", (8000, 8000)), "PNG"), caption, "decompression_bomb"),
        BadRecord("huge_dimensions", _encode(Image.new("L", (20_000, 4)), "PNG"), caption, "too_large"),
        BadRecord("cmyk", _encode(Image.new("CMYK", (64, 64), (0, 200, 200, 0)), "JPEG"), caption, "ok"),
        BadRecord("sixteen_bit", _encode(Image.fromarray(np.full((64, 64), 40_000, dtype=np.uint16)), "PNG"),
                  caption, "ok"),
        BadRecord("rgba", _encode(Image.fromarray(rgba), "PNG"), caption, "ok"),
        BadRecord("palette", _encode(palette, "PNG"), caption, "ok"),
        BadRecord("greyscale", _encode(Image.new("L", (64, 64), 128), "JPEG"), caption, "ok"),
        BadRecord("empty_caption", good_jpeg, b"   ", "empty_caption"),
        BadRecord("overlong_caption", good_jpeg, b"buy now " * 400, "overlong_caption"),
        BadRecord("non_utf8_caption", good_jpeg, b"caf\xe9 \xff\xfe picture", "non_utf8_caption"),
        BadRecord("nul_caption", good_jpeg, caption.replace(b" ", b"\x00 ", 1), "ok"),
        BadRecord("missing_image", None, caption, "missing_image"),
        BadRecord("missing_caption", good_jpeg, None, "missing_caption"),
    ]


REJECTION_REASONS = ("truncated", "empty", "not_an_image", "decompression_bomb", "too_large", "missing_image")


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(records: list[BadRecord], path: str | Path) -> Path:
    """One tar in img2dataset's layout; a missing image or caption is a missing member."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for r in records:
            if r.image is not None:
                _tar_add(tar, f"{r.key}.jpg", r.image)
            if r.text is not None:
                _tar_add(tar, f"{r.key}.txt", r.text)
            _tar_add(tar, f"{r.key}.json", json.dumps({"key": r.key, "status": "success"}).encode())
    return path


def iter_tar(path: str | Path):
    """A WebDataset tar's records as ``{extension: bytes}`` dicts, in order (members grouped by key)."""
    records: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                key, _, extension = member.name.partition(".")
                records.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return iter(records.values())


def count_tar_records(path: str | Path) -> int:
    return sum(1 for _ in iter_tar(path))


def write_parquet(records: list[BadRecord], path: str | Path) -> Path:
    """Image bytes in ``image``; the alt-text as a *binary* column ``text`` so undecodable bytes survive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": [r.key for r in records],
                             "image": pa.array([r.image for r in records], type=pa.binary()),
                             "text": pa.array([r.text for r in records], type=pa.binary())}), path)
    return path


def write_coco_corpus(records: list[BadRecord], out: str | Path) -> Path:
    """A COCO-style captions JSON + image folder. JSON holds text, so non-UTF-8 captions are left out;
    a record without an image gets no file (``missing_file``)."""
    usable = [r for r in records if r.text is None or _utf8(r.text)]
    path = write_coco([(r.key, r.image or b"", None if r.text is None else r.text.decode()) for r in usable], out)
    for r in usable:
        if r.image is None:
            (Path(out) / "images" / f"{r.key}.jpg").unlink()
    return path


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True

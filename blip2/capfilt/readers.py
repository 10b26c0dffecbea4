"""The three input formats as shards of raw records.

A shard is the unit of work and of resume: a WebDataset tar, a Parquet file, or a slice of a COCO
captions file. :func:`read_shard` yields every record of a shard, in order, as a :class:`RawRecord`,
and never raises for bad content: a member that cannot be read, a missing field or a file that is not
there becomes a record with ``error`` set, so it is counted and rejected downstream with its reason. A
shard that cannot be opened at all yields one record with ``error="unreadable_shard"``.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip2.capfilt.config import InputConfig

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass(frozen=True)
class Shard:
    """One unit of input. ``name`` is unique within a corpus and names its outputs and its marker;
    ``start``/``stop`` select a slice of a COCO file's records."""

    name: str
    format: str
    path: str
    start: int = 0
    stop: int = -1


@dataclass
class RawRecord:
    """One record as stored: nothing decoded or validated yet. ``text`` is ``bytes`` when the source
    stores bytes (WebDataset ``.txt``, binary Parquet columns), so encoding errors surface later with a
    reason; ``ground_truth`` is the optional is-the-alt-text-right label, for evaluation only."""

    index: int  # position in its shard: (shard, index) identifies a record even when keys repeat
    key: str | None
    image_ref: str  # where the image came from: "<tar>#<member>", a file path, or "<parquet>#row=<i>"
    image: bytes | None
    text: str | bytes | None
    ground_truth: bool | None = None
    error: str | None = None  # a reason the record is unusable before decoding (e.g. missing_image)
    detail: str = ""


def _shard_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root) if path != root else Path(path.name)
    return "__".join(relative.with_suffix("").parts)


def _files(path: Path, suffix: str) -> tuple[Path, list[Path]]:
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input path {path} does not exist (the toy world's shards: "
                                f"`blip2 toyworld --out DIR` writes DIR/webdataset/<split>)")
    files = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *{suffix} files under {path}")
    return path, files


def list_shards(config: InputConfig) -> list[Shard]:
    """Every shard of the input, in a stable order."""
    path = Path(config.path)
    if config.format == "coco":
        if not path.is_file():
            raise FileNotFoundError(f"COCO captions file {path} does not exist")
        total = len(_coco_records(config))
        return [Shard(f"{path.stem}-{i // config.shard_size:05d}", "coco", str(path), i,
                      min(i + config.shard_size, total)) for i in range(0, max(total, 1), config.shard_size)]
    suffix = ".tar" if config.format == "webdataset" else ".parquet"
    root, files = _files(path, suffix)
    return [Shard(_shard_name(p, root), config.format, str(p)) for p in files]


def read_shard(shard: Shard, config: InputConfig) -> Iterator[RawRecord]:
    """Every record of ``shard``; see the module docstring for how bad content is reported."""
    reader = {"webdataset": _read_webdataset, "parquet": _read_parquet, "coco": _read_coco}[shard.format]
    count = 0
    try:
        for record in reader(shard, config):
            count += 1
            yield record
    except Exception as error:  # a truncated tar, a corrupt Parquet footer, a JSON syntax error ...
        yield RawRecord(count, None, shard.path, None, None, error="unreadable_shard",
                        detail=f"reading stopped after {count} records: {type(error).__name__}: {error}")


def _ground_truth(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


# ---------------------------------------------------------------------------------------------------
# WebDataset (img2dataset layout)


def _read_webdataset(shard: Shard, config: InputConfig) -> Iterator[RawRecord]:
    """Members are grouped by key (path up to the first dot of the base name), in order of first
    appearance; the first image member of a key is its image."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard.path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, extension = base.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            handle = tar.extractfile(member)
            groups.setdefault(key, {}).setdefault(extension.lower(), handle.read() if handle else b"")
    for index, (key, members) in enumerate(groups.items()):
        image_extension = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        metadata = _json_or_empty(members.get("json"))
        text = members.get("txt")
        if text is None and isinstance(metadata.get("caption"), str):
            text = metadata["caption"]
        ground_truth = _ground_truth(metadata.get(config.ground_truth)) if config.ground_truth else None
        if image_extension is None:
            yield RawRecord(index, key, f"{shard.path}#{key}", None, text, ground_truth, "missing_image",
                            f"no image member ({'/'.join(IMAGE_EXTENSIONS)}) for key {key}")
            continue
        yield RawRecord(index, key, f"{shard.path}#{key}.{image_extension}", members[image_extension], text,
                        ground_truth)


def _json_or_empty(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------------------------------
# Parquet


def _read_parquet(shard: Shard, config: InputConfig) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    base = Path(config.images) if config.images else Path(shard.path).parent
    parquet = pq.ParquetFile(shard.path)
    names = set(parquet.schema_arrow.names)
    wanted = [c for c in (config.key_column, config.image_column, config.path_column, config.text_column,
                          config.ground_truth) if c and c in names]
    index = 0
    for batch in parquet.iter_batches(batch_size=256, columns=wanted):
        columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        for row in range(batch.num_rows):
            def value(column: str) -> Any:
                return columns[column][row] if column in columns else None

            key = value(config.key_column)
            key = str(key) if key is not None and str(key) else None
            image, path = value(config.image_column), value(config.path_column)
            if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                image, path = image.get("bytes"), path or image.get("path")
            ground_truth = _ground_truth(value(config.ground_truth)) if config.ground_truth else None
            text = value(config.text_column)
            ref = f"{shard.path}#row={index}"
            if image is not None:
                yield RawRecord(index, key, ref, bytes(image), text, ground_truth)
            elif path:
                yield _from_file(index, key, base / str(path), text, ground_truth)
            else:
                yield RawRecord(index, key, ref, None, text, ground_truth, "missing_image",
                                f"neither {config.image_column!r} nor {config.path_column!r} is set")
            index += 1


def _from_file(index: int, key: str | None, path: Path, text: Any, ground_truth: bool | None) -> RawRecord:
    try:
        data = path.read_bytes()
    except OSError as error:
        return RawRecord(index, key, str(path), None, text, ground_truth, "missing_file",
                         f"{type(error).__name__}: {error}")
    return RawRecord(index, key, str(path), data, text, ground_truth)


# ---------------------------------------------------------------------------------------------------
# COCO-style captions JSON + image folder


def _coco_records(config: InputConfig) -> list[tuple[Any, Any, Any]]:
    """(image entry, annotation id or None, caption or None) per record: one per annotation, and one
    without a caption for an image that has none."""
    data = json.loads(Path(config.path).read_text(encoding="utf-8"))
    images = data.get("images", []) if isinstance(data, dict) else []
    annotations = data.get("annotations", []) if isinstance(data, dict) else []
    by_image: dict[Any, list[dict]] = {}
    for annotation in annotations:
        if isinstance(annotation, dict):
            by_image.setdefault(annotation.get("image_id"), []).append(annotation)
    records = []
    for image in images:
        if not isinstance(image, dict):
            image = {"id": None}
        entries = by_image.pop(image.get("id"), None) or [None]
        records += [(image, a.get("id") if a else None, a.get("caption") if a else None) for a in entries]
    for orphans in by_image.values():  # annotations of images the file does not list
        records += [({"id": a.get("image_id")}, a.get("id"), a.get("caption")) for a in orphans]
    return records


def _read_coco(shard: Shard, config: InputConfig) -> Iterator[RawRecord]:
    base = Path(config.images) if config.images else Path(config.path).parent
    for index, (image, annotation_id, caption) in enumerate(_coco_records(config)[shard.start:shard.stop]):
        image_id = image.get("id")
        key = None if image_id is None else (f"{image_id}" if annotation_id is None else f"{image_id}-{annotation_id}")
        ground_truth = _ground_truth(image.get(config.ground_truth)) if config.ground_truth else None
        file_name = image.get("file_name")
        if not file_name:
            yield RawRecord(index, key, f"{config.path}#image={image_id}", None, caption, ground_truth,
                            "missing_image", f"image {image_id} has no file_name")
            continue
        yield _from_file(index, key, base / str(file_name), caption, ground_truth)


def write_coco(records: list[tuple[str, bytes, str | None]], out: str | Path, name: str = "captions.json") -> Path:
    """A COCO-style captions file plus image folder from (key, JPEG bytes, caption) — for tests and the
    demo, so the COCO reader can be exercised on the toy world."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (key, data, caption) in enumerate(records):
        file_name = f"{key}.jpg"
        (out / "images" / file_name).write_bytes(data)
        images.append({"id": i, "file_name": file_name})
        if caption is not None:
            annotations.append({"id": i, "image_id": i, "caption": caption})
    path = out / name
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path



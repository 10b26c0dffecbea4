"""The toy-world corpus: splits, noisy web alt-texts, and WebDataset / Parquet writers.

Splits (the roles they play in the papers):
- ``web``: the noisy web corpus that CapFilt cleans. A fraction of alt-texts is wrong, in three kinds:
  ``swap`` (another image's caption), ``attribute`` (the right caption with one attribute changed) and
  ``junk`` (``IMG_0412.JPG``, ``click to enlarge``, empty, ...). Ground truth sits in the columns
  ``alt_text_matches`` and ``noise``, which only evaluation may read.
- ``clean``: small and all correct (the role COCO plays); trains the CapFilt bootstrap model.
- ``val`` / ``test``: held-out images with correct captions.
- ``novel``: colour x shape pairs that occur in no other split (compositional generalisation).

Each split is drawn from its own generator, derived from (seed, split name), so any split can be
regenerated alone and equal configs give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from blip2.toyworld.selection import check_report_split
from blip2.toyworld.standard import HELD_OUT_SPLITS, write_standard_split
from blip2.toyworld.text import CAPTION_TEMPLATES, junk_text, random_caption
from blip2.toyworld.world import (
    ATTRIBUTES,
    COLOURS,
    SHAPES,
    Attributes,
    all_attributes,
    encode_jpeg,
    read_attributes,
    render,
)

SPLITS: tuple[str, ...] = ("web", "clean", "val", "test", "novel")
NOISE_KINDS: tuple[str, ...] = ("swap", "attribute", "junk")

# One colour x shape pair per colour, covering every shape: each colour and each shape still occurs in
# training, only these combinations do not.
NOVEL_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(COLOURS)
)


@dataclass(frozen=True)
class ToyWorldConfig:
    """What ``blip2 toyworld`` writes. Sizes are numbers of images per split."""

    seed: int = 0
    image_size: int = 64
    web_size: int = 4000
    clean_size: int = 1000
    val_size: int = 500
    test_size: int = 500
    novel_size: int = 300
    web_noise_rate: float = 0.35  # fraction of web alt-texts that are wrong
    shard_size: int = 1000  # records per WebDataset / Parquet shard
    jpeg_quality: int = 92
    parquet: bool = True  # also write Parquet shards (image bytes + columns)
    webdataset: bool = True
    standard: bool = True  # also write val/test/novel in COCO / Karpathy / VQAv2 / GQA formats (standard.py)

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 and >= 32, got {self.image_size}")
        for split in SPLITS:
            if self.split_size(split) < 0:
                raise ValueError(f"{split}_size must be >= 0")
        if not 0.0 <= self.web_noise_rate <= 1.0:
            raise ValueError(f"web_noise_rate must be in [0, 1], got {self.web_noise_rate}")
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in [1, 100]")

    def split_size(self, split: str) -> int:
        return getattr(self, f"{split}_size")


@dataclass(frozen=True)
class Record:
    """One image and its alt-text. ``alt_text_matches`` / ``noise`` are ground truth for evaluation."""

    key: str
    split: str
    image: bytes  # JPEG
    alt_text: str
    attributes: Attributes
    alt_text_matches: bool
    noise: str  # "none" or one of NOISE_KINDS

    def metadata(self, image_size: int) -> dict:
        """The ``<key>.json`` of img2dataset's layout, plus the toy world's ground truth."""
        return {"key": self.key, "caption": self.alt_text, "status": "success", "width": image_size,
                "height": image_size, "split": self.split, **self.attributes.as_dict(),
                "alt_text_matches": self.alt_text_matches, "noise": self.noise}


def split_attributes(split: str) -> list[Attributes]:
    """The attribute combinations a split draws from: novel pairs only in ``novel``, never elsewhere."""
    novel = set(NOVEL_PAIRS)
    return [a for a in all_attributes() if ((a.colour, a.shape) in novel) == (split == "novel")]


def split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split)])


def _change_one_attribute(attributes: Attributes, rng: np.random.Generator) -> Attributes:
    name = tuple(ATTRIBUTES)[int(rng.integers(len(ATTRIBUTES)))]
    others = [v for v in ATTRIBUTES[name] if v != getattr(attributes, name)]
    return attributes.replace(**{name: others[int(rng.integers(len(others)))]})


def generate_split(config: ToyWorldConfig, split: str) -> list[Record]:
    """All records of one split, deterministic in (config, split). ``test`` and ``novel`` only under an
    evaluation entry point (:mod:`blip2.toyworld.selection`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    check_report_split(split)
    rng = split_rng(config.seed, split)
    pool = split_attributes(split)
    n = config.split_size(split)
    attributes = [pool[i] for i in rng.integers(len(pool), size=n)]
    # Exactly round(rate * n) wrong alt-texts in the web split, the kinds in equal thirds.
    noise = ["none"] * n
    if split == "web":
        wrong = rng.permutation(n)[: round(config.web_noise_rate * n)]
        for j, index in enumerate(wrong):
            noise[index] = NOISE_KINDS[j % len(NOISE_KINDS)]
    records = []
    for i, (attrs, kind) in enumerate(zip(attributes, noise, strict=True)):
        image = encode_jpeg(render(attrs, rng, config.image_size), config.jpeg_quality)
        if kind == "none":
            text = random_caption(attrs, rng)
        elif kind == "swap":
            # Another image's caption; one that states the same attributes would be right, so redraw.
            other = attributes[int(rng.integers(n))]
            if other == attrs:
                others = [a for a in pool if a != attrs]
                other = others[int(rng.integers(len(others)))]
            text = random_caption(other, rng)
        elif kind == "attribute":
            text = random_caption(_change_one_attribute(attrs, rng), rng)
        else:
            text = junk_text(rng)
        records.append(Record(f"{split}_{i:06d}", split, image, text, attrs, kind == "none", kind))
    return records


# ---------------------------------------------------------------------------------------------------
# Writers and a plain reader.


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(records: list[Record], directory: Path, shard_size: int, image_size: int) -> list[Path]:
    """img2dataset's layout: ``NNNNN.tar`` holding ``<key>.jpg``, ``<key>.txt``, ``<key>.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(records), shard_size)):
        path = directory / f"{shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for record in records[start : start + shard_size]:
                _tar_add(tar, f"{record.key}.jpg", record.image)
                _tar_add(tar, f"{record.key}.txt", record.alt_text.encode())
                _tar_add(tar, f"{record.key}.json", json.dumps(record.metadata(image_size)).encode())
        paths.append(path)
    return paths


def write_parquet(records: list[Record], directory: Path, shard_size: int) -> list[Path]:
    """Parquet shards with the image bytes in column ``image`` and the alt-text in ``text``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(records), shard_size)):
        chunk = records[start : start + shard_size]
        table = pa.table({
            "key": [r.key for r in chunk],
            "image": pa.array([r.image for r in chunk], type=pa.binary()),
            "text": [r.alt_text for r in chunk],
            "split": [r.split for r in chunk],
            **{name: [getattr(r.attributes, name) for r in chunk] for name in ("shape", "colour", "size", "position")},
            "alt_text_matches": [r.alt_text_matches for r in chunk],
            "noise": [r.noise for r in chunk],
        })
        path = directory / f"{shard:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


@dataclass
class ToyWorldSummary:
    """What was written, for printing and for ``manifest.json``."""

    config: dict
    counts: dict[str, int] = field(default_factory=dict)
    noise: dict[str, int] = field(default_factory=dict)
    novel_pairs: list[list[str]] = field(default_factory=list)
    caption_templates: int = len(CAPTION_TEMPLATES)
    files: dict[str, list[str]] = field(default_factory=dict)


def write_toyworld(config: ToyWorldConfig, out: str | Path) -> ToyWorldSummary:
    """Write every split under ``out``: ``webdataset/<split>/*.tar``, ``parquet/<split>/*.parquet``, the
    held-out splits in standard formats under ``standard/`` and ``manifest.json``. Returns the summary
    that the manifest holds."""
    out = Path(out)
    summary = ToyWorldSummary(config=asdict(config), novel_pairs=[list(p) for p in NOVEL_PAIRS])
    for split in SPLITS:
        records = generate_split(config, split)
        summary.counts[split] = len(records)
        if split == "web":
            summary.noise = {k: sum(r.noise == k for r in records) for k in ("none", *NOISE_KINDS)}
        files = []
        if config.webdataset:
            files += write_webdataset(records, out / "webdataset" / split, config.shard_size, config.image_size)
        if config.parquet:
            files += write_parquet(records, out / "parquet" / split, config.shard_size)
        if config.standard and split in HELD_OUT_SPLITS:
            files += [p for p in write_standard_split(records, split, out, config.seed).values() if p.is_file()]
        summary.files[split] = [str(p.relative_to(out)) for p in files]
    (out / "manifest.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def read_manifest(out: str | Path) -> dict | None:
    path = Path(out) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def iter_webdataset(paths: list[Path] | list[str]) -> Iterator[dict]:
    """Plain-Python reader of the shards: yields ``{"key", "jpg", "txt", "json"}`` per record."""
    for path in paths:
        with tarfile.open(path) as tar:
            current: dict = {}
            for member in tar:
                key, _, extension = member.name.partition(".")
                if current and current["key"] != key:
                    yield current
                    current = {}
                data = tar.extractfile(member).read()
                current["key"] = key
                current[extension] = json.loads(data) if extension == "json" else (
                    data.decode() if extension == "txt" else data)
            if current:
                yield current



def labels_agree(image: np.ndarray, metadata: dict) -> bool:
    """Whether the attributes in a record's metadata are what its pixels show (see ``read_attributes``)."""
    truth = Attributes(metadata["shape"], metadata["colour"], metadata["size"], metadata["position"])
    try:
        return read_attributes(image) == truth
    except ValueError:
        return False

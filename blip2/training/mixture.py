"""InstructBLIP's instruction mixture: sources in their published formats, sampled by the square root of
their size, the held-out ones never trained on.

A source (:class:`blip2.training.config.InstructionSource`) is read by the evaluation loaders
(:mod:`blip2.datasets`) into examples: an image path and a small JSON-safe payload
(:func:`blip2.training.templates.example_payload`) that a template turns into an instruction and its
answer at every draw. The toy world is one more source: its records stream in as before (WebDataset or
Parquet shards with captions), and its instruction families are its templates.

One pass over the mixture (an *epoch*) holds, for each held-in source, its share of the epoch's examples
(:func:`epoch_counts`): a large source is subsampled, a small one repeated, so that over training each is
seen in proportion to its sampling probability. The examples of each pass are drawn once, before
training (:func:`draw_epoch`); Ray Data then shuffles them with the toy world's records every epoch.
Plain Python, no Ray: ``pipelines/instruct_data.py`` turns this into a Ray Data dataset.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blip2.datasets.captions import load_coco_captions, load_karpathy
from blip2.datasets.errors import DatasetError
from blip2.datasets.instructions import load_aokvqa, load_llava
from blip2.datasets.questions import load_gqa, load_vqa
from blip2.training.config import InstructionSource
from blip2.training.records import _decode, _image_problem, _resized
from blip2.training.templates import example_payload

EXAMPLE_JSON = "example_json"  # the column carrying each example's payload ("" for the toy world's records)


def _items(source: InstructionSource) -> list[Any]:
    fmt = source.format
    if fmt in ("coco_captions", "nocaps"):
        return load_coco_captions(source.annotations, source.images)
    if fmt == "karpathy":
        return load_karpathy(source.annotations, source.images)
    if fmt in ("vqav2", "okvqa"):
        return load_vqa(source.questions, source.annotations or None, source.images)
    if fmt == "gqa":
        return load_gqa(source.questions, source.images)
    if fmt == "aokvqa":
        return load_aokvqa(source.annotations, source.images)
    if fmt == "llava":
        return load_llava(source.annotations, source.images)
    raise ValueError(f"source {source.name!r}: the {fmt} source has no files to load (it streams records)")


@functools.lru_cache(maxsize=16)
def load_source(source: InstructionSource) -> tuple[tuple[str, str], ...]:
    """Every example of a file source as ``(image path, payload JSON)``; a question without an answer (a
    test split's) is an error naming it, since nothing could be trained on it. Cached: the start-up check
    and the job read the same files once."""
    examples = []
    for item in _items(source):
        try:
            payload = example_payload(source.task_type, item)
        except (ValueError, IndexError) as error:
            what = getattr(item, "question_id", getattr(item, "image_id", ""))
            raise DatasetError(f"source {source.name!r}: {type(item).__name__} {what} has no answer to train on "
                               f"({error}); is it a test split?") from error
        examples.append((str(item.path), json.dumps(payload)))
    return tuple(examples)


def check_source_files(sources: Sequence[InstructionSource]) -> None:
    """Load every file source, held out or in: a missing or malformed file fails before training starts.
    (A held-out source's files are read again by ``blip2 evaluate`` after training.)"""
    for source in sources:
        if source.format != "toyworld":
            if source.held_out:
                _items(source)
            else:
                load_source(source)


def mixture_probabilities(sources: Sequence[InstructionSource], sizes: Mapping[str, int]) -> dict[str, float]:
    """Each held-in source's sampling probability: ``weight`` if set, else the square root of its size
    (``size`` if set, else ``sizes[name]``, its number of examples), normalised (InstructBLIP's balance)."""
    raw = {}
    for source in sources:
        if source.held_out:
            continue
        size = source.size or sizes[source.name]
        raw[source.name] = source.weight or float(np.sqrt(size))
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"the held-in sources have no examples: {dict(sizes)}")
    return {name: value / total for name, value in raw.items()}


def epoch_counts(probabilities: Mapping[str, float], sizes: Mapping[str, int], streamed: str = "",
                 epoch_size: int = 0) -> dict[str, int]:
    """How many examples of each held-in source one pass holds, ``round(probability * epoch)``.

    The epoch is ``epoch_size`` if set; else, with a ``streamed`` source (the toy world, whose records
    pass once per epoch), the size that gives it its share; else the sum of the sources' sizes. A
    streamed source's count is its size whatever the epoch (it cannot be subsampled)."""
    if epoch_size:
        epoch = epoch_size
    elif streamed:
        epoch = sizes[streamed] / probabilities[streamed]
    else:
        epoch = sum(sizes[name] for name in probabilities)
    counts = {name: max(1, round(p * epoch)) for name, p in probabilities.items()}
    if streamed:
        counts[streamed] = sizes[streamed]
    return counts


def draw_epoch(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` example indices of a source of ``size``: a random permutation, repeated as often as needed
    (without replacement when ``count <= size``; otherwise each example ``count // size`` or one more times)."""
    if size < 1:
        raise ValueError("a source with no examples cannot be drawn from")
    repeats = -(-count // size)
    return np.concatenate([rng.permutation(size) for _ in range(repeats)])[:count]


def mixture_rows(sources: Sequence[InstructionSource], counts: Mapping[str, int], seed: int) -> list[dict[str, str]]:
    """The file sources' examples of one pass: ``{"path", "source", "example_json"}`` rows, each source's
    drawn with its own generator (adding a source does not change another's draw)."""
    rows = []
    for index, source in enumerate(sources):
        if source.held_out or source.format == "toyworld":
            continue
        examples = load_source(source)
        for i in draw_epoch(counts[source.name], len(examples), np.random.default_rng([seed, index])):
            path, payload = examples[int(i)]
            rows.append({"path": path, "source": source.name, EXAMPLE_JSON: payload})
    return rows


def _read(path: str) -> tuple[bytes | None, str]:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, "missing_image"
    return data, _image_problem(data)


def _read_decoded(path: str, image_size: int) -> tuple[np.ndarray | None, str]:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, "missing_image"
    image, problem = _decode(data)
    return (None, problem) if problem else (_resized(image, image_size), "")


def example_records(batch: Mapping[str, Any], image_size: int | None = None) -> dict[str, np.ndarray]:
    """Rows of :func:`mixture_rows` -> the training columns (``image``, ``captions_json`` empty,
    ``example_json``), without those whose image is missing or does not decode (counted by
    :func:`example_skip_counts`). ``image``: encoded bytes, or with ``image_size`` decoded and resized
    once here, (B, image_size, image_size, 3) uint8, as :func:`blip2.training.records.training_records` gives
    the other sources' (one image type in one mixture)."""
    if image_size:
        read = [_read_decoded(str(p), image_size) for p in batch["path"]]
    else:
        read = [_read(str(p)) for p in batch["path"]]
    keep = [i for i, (_, reason) in enumerate(read) if not reason]
    if image_size:
        images = np.stack([read[i][0] for i in keep]) if keep else \
            np.empty((0, image_size, image_size, 3), dtype=np.uint8)
    else:
        images = np.empty(len(keep), dtype=object)
        images[:] = [read[i][0] for i in keep]
    return {"image": images, "captions_json": np.array(["[]"] * len(keep), dtype=object),
            EXAMPLE_JSON: np.array([batch[EXAMPLE_JSON][i] for i in keep], dtype=object)}


def example_skip_counts(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``reason`` / ``count`` of a batch of rows ("kept" or why the image cannot be used), per source as
    ``<source>:<reason>``."""
    counts = Counter(f"{source}:{_read(str(path))[1] or 'kept'}" for source, path in zip(batch["source"], batch["path"]))
    return {"reason": np.array(list(counts), dtype=object), "count": np.array(list(counts.values()), dtype=np.int64)}

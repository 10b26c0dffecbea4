"""One trial's training, in this process (``blip2 reproduce``): a stage trained from its config with
:func:`blip2.training.loop.train_locally` on toy-world records held in memory, and the CapFilt step
that some stage-1 trials train on.

The trial's seed is the config's ``seed``: it sets the trainable parts' initialisation (``build_model``),
each epoch's record order (below) and every draw inside training (caption choice, ITM negatives,
instruction families: ``train_locally`` derives them from it). The frozen backbones are the shipped ones,
the same in every trial. Stage 1 with ``feature_cache`` trains from the frozen encoder's features,
computed once per process, toy world and source (the encoder is frozen and deterministic: the same
features it would compute each step). Scoring is not here: ``pipelines/reproduce.py`` scores the export
with ``blip2 evaluate``'s code.

A trial's training data is one or more *sources*: a toy-world split by name (its records with their
alt-texts; by default the config's ``train_split``), or ``capfilt:<decoding>``: the web split as an
in-process CapFilt step kept it (:func:`run_capfilt`: each kept image with its kept captions, the web
alt-text among them when it passed the filter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blip2.backbones.build import build_language_variant, find_backbones
from blip2.backbones.language import LanguagePretrainConfig
from blip2.capfilt.calibrate import calibrate
from blip2.capfilt.config import CaptionerConfig, FilterConfig
from blip2.capfilt.models import KEPT, CaptionFilter, Captioner, decode_list
from blip2.capfilt.records import OK
from blip2.config import from_dict
from blip2.metrics import filter_precision_recall
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from blip2.toyworld.world import decode_image
from blip2.training.config import TrainConfig
from blip2.training.records import CAPTIONS_JSON, training_records
from blip2.training.features import FrozenImageEncoder
from blip2.training.loop import train_locally
from blip2.training.tasks import Stage1Task, TrainingTask

CAPFILT_SOURCE = "capfilt:"  # + the captioner's decoding (nucleus or beam)
KEPT_FILE = "kept.json"  # a CapFilt trial's kept captions, by web record key
_ENCODE_BATCH = 256
_SPLITS: dict[tuple, dict[str, np.ndarray]] = {}  # (world, split, encoder or None) -> columns, for this process


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op threads set to ``threads`` for the block, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def capfilt_decoding(source: str) -> str | None:
    """``"beam"`` for ``capfilt:beam``; None for a split name."""
    return source.removeprefix(CAPFILT_SOURCE) if source.startswith(CAPFILT_SOURCE) else None


def _source_columns(world: ToyWorldConfig, source: str, kept: Mapping[str, Sequence[str]] | None,
                    encoder_path: str | None) -> dict[str, np.ndarray]:
    """One source's records as columns: ``image`` (decoded uint8 images) or ``image_embeds`` (the frozen
    encoder's features, with ``encoder_path``), and ``captions_json`` (each record's captions as JSON text).
    A split's columns are kept for the next trial in this process (every trial of a stage reads ``clean``);
    a CapFilt output's, read by one trial, are not."""
    decoding = capfilt_decoding(source)
    key = (world, source, encoder_path)
    if decoding is None and key in _SPLITS:
        return _SPLITS[key]
    records = generate_split(world, "web" if decoding else source)  # test / novel raise (selection guard)
    if decoding:
        if kept is None:
            raise ValueError(f"source {source!r} needs the CapFilt step's kept captions")
        records = [r for r in records if kept.get(r.key)]
        texts = {CAPTIONS_JSON: np.array([json.dumps(list(kept[r.key])) for r in records], dtype=object)}
    else:
        texts = {"txt": np.array([r.alt_text for r in records], dtype=object)}
    # the Ray path's validation: a record without a usable caption (web junk) or image is skipped
    columns = training_records({"jpg": np.array([r.image for r in records], dtype=object), **texts})
    if encoder_path is not None and len(columns[CAPTIONS_JSON]):
        encoder = FrozenImageEncoder(encoder_path)
        embeds = [encoder({"image": columns["image"][s : s + _ENCODE_BATCH]})["image_embeds"]
                  for s in range(0, len(columns["image"]), _ENCODE_BATCH)]
        columns = {"image_embeds": np.concatenate(embeds), CAPTIONS_JSON: columns[CAPTIONS_JSON]}
    if decoding is None:
        _SPLITS[key] = columns
    return columns


def training_columns(task: TrainingTask, sources: Sequence[str] = (),
                     kept: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> dict[str, np.ndarray]:
    """Every training record of the trial, its sources concatenated: ``sources`` (default: the config's
    ``train_split``), ``kept`` the CapFilt step's kept captions by decoding (``{"nucleus": {key: [...]}}``)."""
    config: TrainConfig = task.config
    if config.train_data:
        raise ValueError("an in-process trial trains on toy-world sources (a split or capfilt:<decoding>); "
                         "train_data is not read here")
    features = isinstance(task, Stage1Task) and config.feature_cache
    encoder = str(task.backbones.vision) if features else None
    parts = [_source_columns(config.world, source, (kept or {}).get(capfilt_decoding(source) or ""), encoder)
             for source in (sources or (config.train_split,))]
    columns = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    if len(columns[CAPTIONS_JSON]) < config.optim.batch_size:
        raise ValueError(f"{', '.join(sources or (config.train_split,))}: {len(columns[CAPTIONS_JSON])} records, "
                         f"fewer than one batch of optim.batch_size={config.optim.batch_size}")
    return columns


def train_trial(task: TrainingTask, threads: int = 1,
                on_step: Callable[[int, dict[str, float]], None] | None = None, sources: Sequence[str] = (),
                kept: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> tuple[nn.Module, list[dict]]:
    """Train ``task`` in this process on ``threads`` torch threads over :func:`training_columns`; each
    epoch's record order is drawn from the config's seed (the last partial batch is dropped). Returns the
    model (in eval mode) and the loss history."""
    config = task.config
    with torch_threads(threads):
        columns = training_columns(task, sources, kept)
        size, count = config.optim.batch_size, len(columns[CAPTIONS_JSON])

        def epoch_batches(epoch: int) -> list[Mapping]:
            order = np.random.default_rng([config.seed, epoch]).permutation(count)
            return [{name: values[order[s : s + size]] for name, values in columns.items()}
                    for s in range(0, count - size + 1, size)]

        return train_locally(task, epoch_batches, on_step=on_step)


def run_capfilt(world: ToyWorldConfig, captioner: CaptionerConfig, scorer: FilterConfig, seed: int,
                log: Callable[[str], None] = print) -> dict:
    """BLIP's CapFilt over the toy world's ``web`` split, in this process: ``captioner`` (a stage-2 export)
    writes its synthetic captions, ``scorer`` (a stage-1 export) scores them and the web alt-text, with
    its threshold chosen on ``val`` (never on the web records it filters); each image keeps its best
    ``top_n`` captions at or above it. ``seed`` sets the captioner's draws and the calibration pairs.

    Returns ``{"kept": {key: [captions]}, "report": {...}}``: counts, the threshold and its calibration,
    and how well the filter flagged the wrong web alt-texts (the toy world knows which are wrong)."""
    start = time.perf_counter()
    filter_ = CaptionFilter(scorer)
    calibration = calibrate(filter_, generate_split(world, "val"), seed=seed, batch_size=scorer.batch_size)
    filter_.config = dataclasses.replace(scorer, threshold=calibration["threshold"])
    caption = Captioner(dataclasses.replace(captioner, seed=seed))
    records = generate_split(world, "web")
    kept: dict[str, list[str]] = {}
    web_kept, flagged, wrong, synthetic_kept = 0, [], [], 0
    size = captioner.batch_size
    for s in range(0, len(records), size):
        chunk = records[s : s + size]
        batch = {"key": np.array([r.key for r in chunk], dtype=object),
                 "pixels": np.stack([decode_image(r.image) for r in chunk]),
                 "web_text": np.array([r.alt_text for r in chunk], dtype=object),
                 "status": np.array([OK] * len(chunk), dtype=object)}
        out = filter_(caption(batch))
        for record, status, captions, sources, web_score in zip(
                chunk, out["status"], out["captions"], out["caption_sources"], out["web_score"], strict=True):
            if status == KEPT:
                kept[record.key] = [str(c) for c in decode_list(captions)]
                web_kept += "web" in decode_list(sources)
                synthetic_kept += sum(source != "web" for source in decode_list(sources))
            flagged.append(bool(web_score < filter_.config.threshold))
            wrong.append(not record.alt_text_matches)
        if (s // size) % 20 == 0:
            log(f"capfilt: {min(s + size, len(records))}/{len(records)} web records")
    report = {"input": len(records), "kept": len(kept), "filtered": len(records) - len(kept),
              "kept_captions": sum(len(c) for c in kept.values()), "web_captions_kept": web_kept,
              "synthetic_captions_kept": synthetic_kept, "decoding": captioner.decoding,
              "threshold": calibration["threshold"], "calibration": calibration,
              "web_filter_quality": filter_precision_recall(flagged, wrong),
              "seconds": round(time.perf_counter() - start, 1)}
    return {"kept": kept, "report": report}


def _timed(threads: int, work: Callable[[], dict]) -> dict:
    with torch_threads(threads):
        start = time.perf_counter()
        return {**work(), "seconds": time.perf_counter() - start}


def capfilt_trial(resolved: Mapping, threads: int, log: Callable[[str], None] = print) -> dict:
    """A CapFilt trial (``blip2 reproduce``): :func:`run_capfilt` with ``resolved``'s world, captioner,
    filter and seed on ``threads`` torch threads; its kept captions go to ``<output>/kept.json``.
    Returns ``{"benchmarks": {}, "capfilt": report, "seconds"}``."""
    def work() -> dict:
        result = run_capfilt(from_dict(ToyWorldConfig, resolved["world"]), from_dict(CaptionerConfig, resolved["captioner"]),
                             from_dict(FilterConfig, resolved["filter"]), resolved["seed"], log=log)
        output = Path(resolved["output"])
        output.mkdir(parents=True, exist_ok=True)
        (output / KEPT_FILE).write_text(json.dumps(result["kept"]) + "\n")
        return {"benchmarks": {}, "capfilt": result["report"]}

    return _timed(threads, work)


def build_trial(resolved: Mapping, threads: int, log: Callable[[str], None] = print) -> dict:
    """A build trial (``blip2 reproduce``): the shipped set with its LMs pretrained afresh under
    ``resolved["language"]`` into ``resolved["output"]`` (:func:`blip2.backbones.build.build_language_variant`).
    Returns ``{"benchmarks": {}, "backbones": the LMs' quality, "seconds"}``."""
    def work() -> dict:
        built = build_language_variant(find_backbones(), from_dict(LanguagePretrainConfig, resolved["language"]),
                                       resolved["output"], log=log)
        return {"benchmarks": {}, "backbones": built.report()["quality"]}

    return _timed(threads, work)

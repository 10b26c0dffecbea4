"""The training jobs' input on Ray Data (Ray wiring; the per-record work is in ``blip2/training/records.py``).

Every source of ``train_data`` (WebDataset tars, Parquet, CapFilt's kept output) or the toy world's split is
read as stored, each record validated once (a bad image or caption is skipped and counted by reason, never
fatal), images decoded and resized to the image encoder's size in that same Ray Data stage, off the training
step's path. With ``materialize_data`` (the default) one pass does it all: the validated records are held
in Ray's object store, counted from there, and every epoch streams the kept ones from memory. Without it
(a corpus larger than the object store) a counting pass reads the input first and every epoch reads and
decodes it again. Stage 1 may train from the frozen image encoder's cached outputs (:func:`feature_cache`).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import ray

from blip2.config import to_dict
from blip2.toyworld.selection import check_report_split
from blip2.training.config import InstructConfig, TrainConfig
from blip2.training.records import kept_records, reason_counts, skip_counts, training_records, validated_records
from blip2.training.features import FrozenImageEncoder
from blip2.training.tasks import TrainingTask
from pipelines.common import keep_data_order, log
from pipelines.instruct_data import mixture_data
from pipelines.toyworld import ToyWorldJobConfig, ensure_toyworld

FEATURE_CACHE = "feature_cache"


def worker_threads(config: TrainConfig, cpus: float) -> int:
    """torch's intra-op threads in a worker given ``cpus`` (``scaling.torch_threads``, else its CPUs)."""
    return config.scaling.torch_threads or max(1, int(cpus))


def _read_source(source: Path) -> ray.data.Dataset:
    """One training source (a directory or a file of WebDataset tars or of Parquet), records as stored.

    WebDataset members stay raw bytes (``decoder=None``): Ray's own decoders raise on one bad record (a
    truncated JPEG, an alt-text that is not UTF-8) and one raise aborts the whole dataset, so images and
    captions are validated record by record in :func:`prepared_records` instead."""
    if not source.exists():
        raise FileNotFoundError(f"train_data {source} does not exist")
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    tars = [str(p) for p in files if p.suffix == ".tar"]
    parquets = [str(p) for p in files if p.suffix == ".parquet"]
    if tars and not parquets:
        return ray.data.read_webdataset(tars, decoder=None)  # Ray Data
    if parquets and not tars:
        return ray.data.read_parquet(parquets)  # Ray Data: toy-world Parquet or CapFilt's kept output
    raise ValueError(f"{source}: expected WebDataset .tar shards or .parquet files (not both), "
                     f"found {len(tars)} tar and {len(parquets)} parquet")


class NotEnoughData(ValueError):
    """The training data cannot fill one batch per worker: an epoch would yield no step."""


def count_records(source: Path | str, data: ray.data.Dataset) -> dict:
    """Read ``data`` once and count its records: kept, and skipped for each reason (a bad image, no
    usable caption). This pass decodes every image once more than training alone would."""
    return _counted(source, data.map_batches(skip_counts, batch_format="numpy", udf_modifying_row_count=True))


def _counted(source: Path | str, tallies: ray.data.Dataset) -> dict:
    """A source's accounting from a dataset of ``reason``/``count`` rows (:func:`skip_counts`)."""
    counts: dict[str, int] = {}
    for row in tallies.iter_rows():  # Ray Data
        counts[row["reason"]] = counts.get(row["reason"], 0) + int(row["count"])
    kept = counts.pop("kept", 0)
    return {"source": str(source), "records": kept + sum(counts.values()), "kept": kept,
            "skipped": dict(sorted(counts.items()))}


def prepared_records(source: Path | str, raw: ray.data.Dataset, image_size: int | None,
                     materialize: bool) -> tuple[ray.data.Dataset, dict]:
    """One source's training records (``image`` decoded and resized to ``image_size``, ``captions_json``)
    and its accounting. With ``materialize``, one pass validates and decodes every record into the object
    store and the counts are read from it; otherwise a counting pass first, and the records stay lazy."""
    if materialize and image_size:
        validated = raw.map_batches(validated_records, fn_kwargs={"image_size": image_size},  # Ray Data
                                    batch_format="numpy").materialize()
        report = _counted(source, validated.map_batches(reason_counts, batch_format="numpy",
                                                        udf_modifying_row_count=True))
        return validated.map_batches(kept_records, batch_format="numpy", udf_modifying_row_count=True), report
    report = count_records(source, raw)
    # a web corpus has records without a usable image or alt-text; nothing can be trained on them
    return raw.map_batches(training_records, fn_kwargs={"image_size": image_size}, batch_format="numpy",
                           udf_modifying_row_count=True), report


def describe_input(report: dict) -> str:
    """``"1000 records, 980 kept, 20 skipped (truncated 3, non_utf8_caption 17)"``."""
    skipped = report["skipped"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
    return (f"{report['records']} records, {report['kept']} kept, {sum(skipped.values())} skipped"
            + (f" ({reasons})" if reasons else ""))


def training_data(config: TrainConfig, image_size: int | None = None) -> tuple[ray.data.Dataset, dict]:
    """The training records as one Ray Data dataset, images decoded and resized to ``image_size`` in Ray
    Data, off the training step's path (:func:`prepared_records`); and the input's accounting: each
    source's records, kept and skipped by reason, and their totals. Instruction tuning reads its mixture
    (the toy world's records among its sources, :func:`pipelines.instruct_data.mixture_data`).
    Raises :class:`NotEnoughData` when the kept records cannot fill one batch on every worker."""
    if isinstance(config, InstructConfig):
        data, totals = mixture_data(config, functools.partial(records_data, image_size=image_size), image_size)
        _check_one_batch(config, totals, [s.name for s in config.mixture_sources() if not s.held_out])
        return data, totals
    return records_data(config, image_size=image_size)


def _check_one_batch(config: TrainConfig, totals: dict, sources: list) -> None:
    workers, batch_size = config.scaling.num_workers, config.optim.batch_size
    if totals["kept"] // workers < batch_size:
        raise NotEnoughData(
            f"train_data {', '.join(map(str, sources))}: {describe_input(totals)}; that is fewer than one batch "
            f"of optim.batch_size={batch_size} on each of scaling.num_workers={workers} worker(s), so an "
            f"epoch would give no full batch. Add data or lower optim.batch_size.")


def records_data(config: TrainConfig, check_batch: bool = True,
                 image_size: int | None = None) -> tuple[ray.data.Dataset, dict]:
    """The captioned records of ``train_data`` (or the toy world's ``train_split``), as :func:`training_data`."""
    if config.train_data:
        sources = [Path(s) for s in config.train_data]
    else:
        check_report_split(config.train_split)  # training on test/novel would fit the reports to them
        ensure_toyworld(ToyWorldJobConfig(out=config.toyworld, world=config.world))
        sources = [Path(config.toyworld) / "webdataset" / config.train_split]
    prepared = [prepared_records(source, _read_source(source), image_size, config.materialize_data)
                for source in sources]
    per_source = [report for _, report in prepared]
    skipped: dict[str, int] = {}
    for report in per_source:
        for reason, count in report["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    totals = {"records": sum(r["records"] for r in per_source), "kept": sum(r["kept"] for r in per_source),
              "skipped": dict(sorted(skipped.items())), "sources": per_source}
    log(f"input: {describe_input(totals)} from {', '.join(map(str, sources))}")
    if check_batch:
        _check_one_batch(config, totals, sources)
    datasets = [data for data, _ in prepared]
    return (datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]), totals  # Ray Data


def feature_cache(config: TrainConfig, task: TrainingTask, data: ray.data.Dataset) -> ray.data.Dataset:
    """The frozen image encoder's outputs of every training record, computed once by a Ray Data stage
    into ``<output>/feature_cache/`` (reused while the data source and the encoder are the same)."""
    cache = config.output / FEATURE_CACHE
    marker = cache / "_COMPLETE.json"
    key = {"train_data": list(config.train_data) or f"{config.toyworld}:{config.train_split}",
           "world": to_dict(config.world), "vision": str(task.backbones.vision)}
    if marker.is_file() and json.loads(marker.read_text()) == key:
        log(f"feature cache: reusing {cache}")
        return ray.data.read_parquet(str(cache / "data"))
    start = time.perf_counter()
    scaling = config.scaling
    encoded = data.map_batches(  # Ray Data: the encoder loads once per actor
        FrozenImageEncoder, fn_constructor_kwargs={"vision_path": str(task.backbones.vision),
                                                   "device": "cuda" if scaling.use_gpu else "cpu",
                                                   "threads": worker_threads(config, scaling.cpus_per_worker)},
        batch_size=config.optim.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=scaling.num_workers),
        num_cpus=scaling.cpus_per_worker, num_gpus=scaling.gpus_per_worker if scaling.use_gpu else 0)
    if config.materialize_data:  # encoded once into the object store: the cache is written from there and
        encoded = encoded.materialize()  # training reads it there, not back from Parquet  # Ray Data
    encoded.write_parquet(str(cache / "data"))
    marker.write_text(json.dumps(key))
    log(f"feature cache: wrote {cache} in {time.perf_counter() - start:.1f}s")
    return encoded if config.materialize_data else ray.data.read_parquet(str(cache / "data"))


def train_dataset(config: TrainConfig, task: TrainingTask, clock: dict[str, float]) -> tuple[ray.data.Dataset, dict]:
    """The dataset a training job hands Ray Train, in the order the job's seed fixes (:func:`keep_data_order`):
    the records (:func:`training_data`), stage 1's cached image features when ``feature_cache`` is on,
    materialised once, their blocks shuffled by the seed (each worker then shuffles locally, seeded too).
    Adds each phase's seconds to ``clock``; returns the dataset and the input's accounting."""
    keep_data_order()
    phase = time.perf_counter()
    data, input_report = training_data(config, task.image_size)
    clock["input_check"] = time.perf_counter() - phase
    if config.feature_cache:
        phase = time.perf_counter()
        data = feature_cache(config, task, data)
        clock["feature_cache"] = time.perf_counter() - phase
    if config.materialize_data:  # one pass now; every epoch then streams from the object store
        phase = time.perf_counter()
        data = data.materialize()  # Ray Data
        clock["materialize"] = time.perf_counter() - phase
    if config.shuffle_buffer:  # sources come one after the other: mix their blocks, then shuffle locally
        data = data.randomize_block_order(seed=config.seed)  # Ray Data
    return data, input_report

"""``blip2 capfilt``: bootstrap a noisy image-text corpus into a clean one on Ray Data (BLIP's CapFilt).

    python -m pipelines.capfilt [--config pipelines/configs/capfilt_toy.yaml] [key=value ...]

Stages (each a Ray Data ``map_batches``):
  1. read + decode + validate (CPU tasks, one input shard per task; ``blip2.capfilt.records.decode_shards``,
     whose module imports no torch): every record becomes a row, the bad ones marked rejected with a
     reason; each shard ends with an END row that carries its count;
  2. captioner (callable class on an actor pool: weights load once per actor): K synthetic captions per
     valid image by nucleus sampling;
  3. filter (callable class on an actor pool): ITM match probability of the web caption and of each
     synthetic one; keep those above the threshold, best N first.
Rows are never dropped between stages — rejected rows ride along untouched — so every record reaches
the driver, which writes each input shard's outputs as soon as all its rows are in, then its
completion marker. A re-run skips shards with markers (resume: no duplicates, no gaps); an actor that
dies is restarted by Ray and its batch redone; a row that arrives twice is dropped. At the end the
accounting invariant (input = kept + filtered + rejected) is checked on the files and printed, and
``report.json`` and ``scores.png`` are written. Outputs: see ``blip2/capfilt/outputs.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy

from blip2.capfilt.config import CapFiltConfig, CaptionerConfig, FilterConfig
from blip2.capfilt.models import Captioner, CaptionFilter, check_sources
from blip2.capfilt.outputs import ShardCollector, completed_shards, prepare_output
from blip2.capfilt.readers import Shard, list_shards
from blip2.capfilt.records import decode_shards
from blip2.capfilt.report import AccountingError, build_report, summary_lines
from blip2.config import from_dict, to_dict
from pipelines.common import init_ray, job_parser, keep_data_order, log, parse_config, quiet_progress_bars


class CaptionerActor:
    """Ray Data callable class: one captioner per actor, loaded once."""

    def __init__(self, config: dict, torch_threads: int, device: str) -> None:
        quiet_progress_bars()
        torch.set_num_threads(torch_threads)
        self.captioner = Captioner(from_dict(CaptionerConfig, config), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.captioner(batch)


class FilterActor:
    """Ray Data callable class: one ITM filter per actor, loaded once."""

    def __init__(self, config: dict, torch_threads: int, device: str) -> None:
        quiet_progress_bars()
        torch.set_num_threads(torch_threads)
        self.filter = CaptionFilter(from_dict(FilterConfig, config), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.filter(batch)


def _pool(actors) -> ActorPoolStrategy:
    if actors.min_actors == actors.max_actors:
        return ActorPoolStrategy(size=actors.min_actors)
    return ActorPoolStrategy(min_size=actors.min_actors, max_size=actors.max_actors)  # autoscaling


def build_dataset(config: CapFiltConfig, shards: Sequence[Shard]) -> ray.data.Dataset:
    """The lazy Ray Data pipeline over ``shards``; consuming it yields the filter's output rows."""
    ds = ray.data.from_items([asdict(s) for s in shards], override_num_blocks=max(len(shards), 1))  # Ray Data
    ds = ds.map_batches(  # Ray Data: CPU tasks, one shard each; 1 row in, many out
        decode_shards, batch_size=1, udf_modifying_row_count=True,
        fn_kwargs={"input_config": to_dict(config.input), "validation": to_dict(config.validation),
                   "image_size": config.image_size, "keep_bytes": config.image_mode == "bytes",
                   "batch_size": config.decode_batch_size})
    device = config.device
    if config.captioner.num_captions > 0:
        c = config.captioner
        ds = ds.map_batches(  # Ray Data: actor pool, weights once per actor; no row is dropped here
            CaptionerActor, fn_constructor_kwargs={"config": to_dict(c), "torch_threads": config.torch_threads,
                                                   "device": device},
            batch_size=c.batch_size, compute=_pool(c.actors), num_cpus=c.actors.num_cpus, num_gpus=c.actors.num_gpus,
            udf_modifying_row_count=False)
    f = config.filter
    return ds.map_batches(  # Ray Data: actor pool; rows are scored and labelled kept/filtered, not dropped
        FilterActor, fn_constructor_kwargs={"config": to_dict(f), "torch_threads": config.torch_threads,
                                            "device": device},
        batch_size=f.batch_size, compute=_pool(f.actors), num_cpus=f.actors.num_cpus, num_gpus=f.actors.num_gpus,
        udf_modifying_row_count=False)


def run(config: CapFiltConfig) -> dict | None:
    """Process the pending shards; when every shard is done, check the accounting and write the report
    (returned). Returns None when ``max_shards`` left shards for a later run."""
    out = Path(config.output)
    check_sources(config.captioner, config.filter)
    shards = list_shards(config.input)
    prepare_output(out)
    done = completed_shards(out)
    pending = [s for s in shards if s.name not in done]
    if config.max_shards:
        pending = pending[: config.max_shards]
    log(f"capfilt: {len(shards)} shard(s) in {config.input.path} ({config.input.format}); "
        f"{len(shards) - len([s for s in shards if s.name not in done])} already done, {len(pending)} to process")
    start = time.perf_counter()
    records = 0
    if pending:
        init_ray()  # RAY_ADDRESS (ray job submit) selects a cluster; otherwise a local instance
        keep_data_order()  # the captioner's batches, each seeded by its first record, hold the same records every run
        collector = ShardCollector(out, config.image_mode)
        for batch in build_dataset(config, pending).iter_batches(batch_size=None, batch_format="numpy"):
            for marker in collector.add(batch):
                records += marker["input"]
                log(f"shard {marker['shard']}: {marker['input']} records -> kept {marker['kept']}, filtered "
                    f"{marker['filtered']}, rejected {marker['rejected']} ({records / (time.perf_counter() - start):.1f} "
                    "records/s)")
        incomplete = collector.incomplete()
        if incomplete:
            raise AccountingError(f"the pipeline ended with rows missing: {incomplete}")
    elapsed = time.perf_counter() - start
    remaining = [s.name for s in shards if s.name not in completed_shards(out)]
    if remaining:
        log(f"capfilt paused: {records} records this run into {out}; {len(remaining)} shard(s) left; run the same "
            "command again to continue")
        return None
    report = build_report(out, [s.name for s in shards], config.filter.threshold,
                          {"this_run": {"records": records, "seconds": elapsed,
                                        "records_per_second": records / elapsed if elapsed > 0 else None},
                           "config": to_dict(config)}, score=config.filter.score)
    for line in summary_lines(report):
        log(line)
    counts = report["counts"]
    log(f"capfilt done: {counts['input']} records -> kept {counts['kept']}, filtered {counts['filtered']}, rejected "
        f"{counts['rejected']}; outputs in {out}: kept/ filtered/ rejected/ scores/ report.json scores.png")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("blip2 capfilt", __doc__, "capfilt_toy.yaml")
    config, _ = parse_config(parser, CapFiltConfig, argv)
    try:
        run(config)
    except (FileNotFoundError, AccountingError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    # Import under the module's real name so Ray pickles the actor classes by reference, not by value
    # from __main__ (by value, their config annotations would not resolve on the workers).
    from pipelines.capfilt import main as _main

    raise SystemExit(_main())

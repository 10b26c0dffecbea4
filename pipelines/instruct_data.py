"""The instruction mixture on Ray Data, and the held-out sources scored after training (Ray wiring only:
``blip2/training/mixture.py`` holds the sampling, ``blip2/training/templates.py`` the templates).

Every held-in source becomes rows of the same three columns: ``image`` (decoded and resized to the image
encoder's size, as every training job's records are), ``captions_json`` and ``example_json``. The toy world's records stream in as every other training job reads them (their
``example_json`` is empty: their families are drawn from the caption); a file source's examples of one
pass are drawn on the driver, shuffled, and read image by image (a missing or undecodable image is
skipped and counted by source and reason). Held-out sources are scored zero-shot on the export by
``blip2 evaluate``'s code, each with its format's metric and its task type's first template.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray

from blip2.training.config import HELD_OUT_TASKS_BY_FORMAT, InstructConfig
from blip2.training.mixture import (
    EXAMPLE_JSON,
    epoch_counts,
    example_records,
    example_skip_counts,
    load_source,
    mixture_probabilities,
    mixture_rows,
)
from blip2.training.templates import eval_prompt
from pipelines.common import log


def _with_empty_examples(batch: dict) -> dict:
    return {**batch, EXAMPLE_JSON: np.array([""] * len(batch["image"]), dtype=object)}


def _file_source_reports(data: ray.data.Dataset, names: list[str]) -> list[dict]:
    """Per file source: the pass's examples, kept and skipped by reason (reads every image once)."""
    counts: dict[str, dict[str, int]] = {name: {} for name in names}
    for row in data.map_batches(example_skip_counts, batch_format="numpy").iter_rows():  # Ray Data
        source, reason = str(row["reason"]).split(":", 1)
        counts[source][reason] = counts[source].get(reason, 0) + int(row["count"])
    reports = []
    for name, reasons in counts.items():
        kept = reasons.pop("kept", 0)
        reports.append({"source": name, "records": kept + sum(reasons.values()), "kept": kept,
                        "skipped": dict(sorted(reasons.items()))})
    return reports


def mixture_data(config: InstructConfig, records_data: Callable[..., tuple[ray.data.Dataset, dict]],
                 image_size: int | None = None) -> tuple[ray.data.Dataset, dict]:
    """The held-in sources as one Ray Data dataset (one pass of the mixture), and the input's accounting:
    ``records_data(config, check_batch=False)`` reads the toy world's records (the training jobs' usual
    reader); the report adds each file source's counts to ``sources`` and the mixture under ``mixture``
    (per held-in source: format, task type, size, probability, examples per pass). ``image_size``: the
    file sources' images are decoded and resized to it in Ray Data, as ``records_data`` does the toy
    world's (one image type in one dataset)."""
    sources = config.mixture_sources()
    held_in = [s for s in sources if not s.held_out]
    toy = next((s for s in held_in if s.format == "toyworld"), None)
    parts, reports, sizes = [], [], {}
    if toy is not None:
        toy_data, toy_report = records_data(config, check_batch=False)
        parts.append(toy_data)
        reports += toy_report["sources"]
        sizes[toy.name] = toy_report["kept"]
    files = [s for s in held_in if s.format != "toyworld"]
    for source in files:
        sizes[source.name] = len(load_source(source))
    probabilities = mixture_probabilities(sources, sizes)
    counts = epoch_counts(probabilities, sizes, toy.name if toy else "", config.mixture_epoch)
    if files:
        rows = mixture_rows(sources, counts, config.seed)
        order = np.random.default_rng([config.seed, 7]).permutation(len(rows))  # sources interleaved
        raw = ray.data.from_items([rows[i] for i in order])  # Ray Data
        reports += _file_source_reports(raw, [s.name for s in files])
        parts = [p.map_batches(_with_empty_examples, batch_format="numpy") for p in parts]  # Ray Data
        parts.append(raw.map_batches(example_records, fn_kwargs={"image_size": image_size},  # Ray Data
                                     batch_format="numpy", udf_modifying_row_count=True))
    skipped: dict[str, int] = {}
    for report in reports:
        for reason, count in report["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    mixture = {s.name: {"format": s.format, "task": s.task_type, "size": s.size or sizes[s.name],
                        "probability": round(probabilities[s.name], 4), "per_epoch": counts[s.name]}
               for s in held_in}
    totals = {"records": sum(r["records"] for r in reports), "kept": sum(r["kept"] for r in reports),
              "skipped": dict(sorted(skipped.items())), "sources": reports, "mixture": mixture}
    log("mixture: " + ", ".join(f"{name} {m['probability']:.3f} ({m['per_epoch']} per epoch)"
                                for name, m in mixture.items())
        + "; held out: " + (", ".join(s.name for s in sources if s.held_out) or "no source"))
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), totals  # Ray Data


def evaluate_held_out(config: InstructConfig, model_dir: Path) -> dict:
    """Each held-out source scored zero-shot on the export (``<output>/eval/<source>/``):
    ``{name: {format, task, <metrics>, seconds}}``."""
    from pipelines.evaluate import EvaluateConfig, run

    results = {}
    scaling = config.scaling
    for source in (s for s in config.mixture_sources() if s.held_out):
        log(f"[instruct] held-out source {source.name}: zero-shot {HELD_OUT_TASKS_BY_FORMAT[source.format]}")
        report = run(EvaluateConfig(
            task=HELD_OUT_TASKS_BY_FORMAT[source.format], model=str(model_dir), annotations=source.annotations,
            questions=source.questions, images=source.images, out=str(config.output / "eval" / source.name),
            prompt=eval_prompt(source.task_type), generation=source.generation, limit=source.limit,
            num_actors=config.eval_actors, gpus_per_actor=scaling.gpus_per_worker if scaling.use_gpu else 0.0))
        results[source.name] = {"format": source.format, "task": source.task_type, **report["metrics"],
                                "seconds": report["seconds"]}
    return results

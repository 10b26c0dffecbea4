"""The shipped toy configs, run in full: the record that the README's "The shipped toy configs, measured" block is generated from.

    python benchmarks/toy_runs.py [--stage1-seeds 0] [--instruct-seeds 0,1,2] [--storage DIR] [--out FILE]

One local Ray instance (as ``blip2 train`` starts it), the three training jobs one after the other, each
from its shipped config unchanged (``stage1_toy.yaml``, ``stage2_toy.yaml``, ``instruct_toy.yaml``) but
for ``seed`` and the paths: stage 1 once per ``--stage1-seeds``; stage 2 (OPT) from the first stage-1
seed's output; instruction tuning once per ``--instruct-seeds`` from that stage 2. Every job is scored by
its config's ``eval:`` sets through ``blip2 evaluate``'s code (held-out ``test`` and ``novel``), exactly as
``blip2 train`` scores it.

The record (``--out``, default ``benchmarks/toy_runs.json``) holds, per job: its config file, seed, steps,
wall seconds, samples/s, goodput and fixed-cost share (``report.json``'s ``time_split``), and every
numeric figure of its ``benchmarks``; with the commit, date, machine and load average. Then
``python benchmarks/readme_results.py`` regenerates the README's block from it (CI checks they agree).
Stage 1 runs about 800 steps at ~1.5 steps/s on two idle cores: the whole record takes ~40 minutes.

``--reuse --storage DIR`` (DIR: an earlier record's ``--storage``) scores the runs there again instead of
training them again, for a change in how a finished model is scored (eval sets, ``rerank_k``,
``rerank_itc_scale``, ``itm_eval_images``): a job is reused only when its run finished training exactly as
its config now says (a key added to the config since must hold its default), and a job downstream of a
retrained one is retrained too. Reused jobs say so in the record, with the time they finished; their wall
time and goodput are the original run's (the README leaves them out: they were measured under that time's load).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run_all import machine  # noqa: E402
from blip2.config import load_config, to_dict  # noqa: E402
from blip2.training.config import TrainConfig  # noqa: E402
from blip2.training.tasks import MODEL_DIR, TASKS  # noqa: E402
from pipelines.common import CONFIG_DIR, init_ray, quiet_progress_bars  # noqa: E402
from pipelines.demo_record import commit as git_commit  # noqa: E402
from pipelines.toyworld import ToyWorldJobConfig, ensure_toyworld  # noqa: E402
from pipelines.train import DEFAULT_CONFIGS, absolute_paths, fit, toy_eval  # noqa: E402
from pipelines.train_eval import evaluate_training_output  # noqa: E402

RECORD = ROOT / "benchmarks" / "toy_runs.json"


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds: comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds: at least one, none repeated, got {text!r}")
    return seeds


def _numbers(metrics: dict) -> dict:
    """A benchmark's figures without its example predictions."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# Settings that only say how a finished export is scored: a run trained with other values of these is still
# the shipped config's run (``--reuse`` scores it again with the current ones).
SCORING_KEYS = ("eval", "eval_num_actors", "rerank_k", "rerank_itc_scale", "itm_eval_images")


def _same(old, new, default) -> bool:
    """Whether a run's recorded config ``old`` trained as ``new`` does. A key the recorded config lacks (it
    was added to the config later) must hold its ``default``, which keeps the behaviour from before it."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return old == new
    default = default if isinstance(default, dict) else {}
    return set(old) <= set(new) and all(_same(old[k], v, default.get(k)) if k in old else v == default.get(k)
                                        for k, v in new.items())


# Where a run was written and which copy of the toy world it read (its ``world`` settings are compared): a
# finished run elsewhere (another benchmark's, ``capfilt_bootstrap.py --round1``) may differ in these.
PLACE_KEYS = ("name", "storage_path", "toyworld")


def reuse_refusal(config: TrainConfig, run_dir: Path | None = None) -> str:
    """Why the run at ``run_dir`` (default: ``config``'s output directory) cannot stand for a run of
    ``config``, or "" when it can: it finished (a ``report.json`` with the goodput split and
    ``optim.max_steps`` steps) and trained exactly as ``config`` says — every key but :data:`SCORING_KEYS`,
    and, for a run elsewhere, :data:`PLACE_KEYS`."""
    return _checked_report(config, run_dir)[1]


def finished_run(config: TrainConfig, run_dir: Path | None = None) -> dict | None:
    """The report of the run at ``run_dir`` (default: ``config``'s output directory) when it can stand for
    a run of ``config`` (:func:`reuse_refusal`); else None."""
    report, refusal = _checked_report(config, run_dir)
    return None if refusal else report


def _checked_report(config: TrainConfig, run_dir: Path | None) -> tuple[dict | None, str]:
    """The run's report, read once, and :func:`reuse_refusal`'s reason ("" when it can stand)."""
    run_dir = Path(run_dir or config.output)
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None, f"{run_dir} holds no readable report.json"
    if not isinstance(report, dict) or "time_split" not in report:
        return None, f"{run_dir}/report.json is not a finished run's (no time_split)"
    if report.get("steps") != config.optim.max_steps:
        return report, f"it trained {report.get('steps')} steps, not {config.optim.max_steps}"
    skip = set(SCORING_KEYS) | (set() if run_dir == Path(config.output) else set(PLACE_KEYS))
    recorded = {k: v for k, v in report.get("config", {}).items() if k not in skip}
    new = {k: v for k, v in json.loads(json.dumps(to_dict(config))).items() if k not in skip}
    default = json.loads(json.dumps(to_dict(type(config)())))
    differing = sorted(k for k in set(recorded) | set(new) if not _same({k: recorded[k]} if k in recorded else {},
                                                                         {k: new[k]} if k in new else {}, default))
    return report, f"it trained with other {', '.join(differing)}" if differing else ""


def _finished_at(config: TrainConfig) -> str:
    """When a finished run wrote its report (the end of its training and first scoring), UTC."""
    stamp = (config.output / "report.json").stat().st_mtime
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def rescore(stage: str, config: TrainConfig, report: dict) -> dict:
    """``report`` with its export scored again by the current code and ``config``'s eval settings."""
    task = TASKS[stage][1](config)
    benchmarks = evaluate_training_output(config, config.output / MODEL_DIR, str(task.backbones.qformer_tokenizer),
                                          str(task.backbones.vision))
    return {**report, "benchmarks": benchmarks, "headline": task.headline(toy_eval(config, benchmarks))}


def run_job(stage: str, seed: int, overrides: list[str], reuse: bool = False) -> dict:
    """One shipped toy config in full on the running Ray instance; its record. ``reuse``: a finished run of
    the same training config in the storage is scored again instead of trained again."""
    config_cls, _ = TASKS[stage]
    path = CONFIG_DIR / DEFAULT_CONFIGS[stage]
    overrides = [f"seed={seed}", *overrides]
    config = absolute_paths(load_config(config_cls, path, overrides))
    start = time.perf_counter()
    finished = finished_run(config) if reuse else None
    if finished is not None:
        report = rescore(stage, config, finished)
        print(f"== {stage} seed {seed}: reused {config.output} (trained as this config says), scored again in "
              f"{time.perf_counter() - start:.0f} s, headline {report['headline']}", flush=True)
    else:
        report = json.loads((fit(stage, config) / "report.json").read_text())
    split = report["time_split"]
    wall = split["seconds"]["wall"] if finished is not None else time.perf_counter() - start
    if finished is None:
        print(f"== {stage} seed {seed}: {wall:.0f} s, headline {report['headline']}", flush=True)
    return {"stage": stage, "config": f"pipelines/configs/{path.name}", "seed": seed, "steps": report["steps"],
            "overrides": overrides, "wall_seconds": round(wall, 1),
            **({"reused": True, "finished_at": _finished_at(config)} if finished is not None else {}),
            "samples_per_s": report["samples_per_s"],
            "goodput": split["goodput"]["ratio"], "fixed_fraction": split["goodput"]["fixed_fraction"],
            "seconds": split["seconds"], "headline": report["headline"],
            "benchmarks": {name: _numbers(metrics) for name, metrics in report["benchmarks"].items()}}


def run(stage1_seeds: list[int], instruct_seeds: list[int], storage: Path, extra: list[str],
        reuse: bool = False) -> list[dict]:
    import ray

    quiet_progress_bars()
    world = storage / "world"
    ensure_toyworld(ToyWorldJobConfig(out=str(world)))
    common = [f"toyworld={world}", f"storage_path={storage / 'runs'}", *extra]
    runs = []
    init_ray(include_dashboard=False)  # as `blip2 train` starts it: the workers' progress lines reach this log
    try:
        for seed in stage1_seeds:
            runs.append(run_job("stage1", seed, [*common, f"name=stage1-toy-seed{seed}"], reuse))
        stage1 = storage / "runs" / f"stage1-toy-seed{stage1_seeds[0]}"
        runs.append(run_job("stage2", 0, [*common, f"stage1={stage1}"], reuse and runs[0].get("reused", False)))
        for seed in instruct_seeds:
            runs.append(run_job("instruct", seed, [*common, f"stage2={storage / 'runs' / 'stage2-toy-opt'}",
                                                   f"name=instruct-toy-opt-seed{seed}"],
                                reuse and runs[len(stage1_seeds)].get("reused", False)))
    finally:
        ray.shutdown()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1-seeds", type=_seeds, default=[0], help="stage-1 seeds (default: 0); stage 2 "
                        "starts from the first")
    parser.add_argument("--instruct-seeds", type=_seeds, default=[0, 1, 2], help="instruction-tuning seeds "
                        "(default: 0,1,2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every job (repeatable; a record with overrides is not the shipped configs')")
    parser.add_argument("--storage", help="keep the runs here (default: a temporary directory, removed after)")
    parser.add_argument("--out", default=str(RECORD), help="the record to write (default: %(default)s)")
    parser.add_argument("--reuse", action="store_true", help="with --storage: a job whose run there finished "
                        "training exactly as its config says (all but how it is scored: eval sets, rerank_k, "
                        "rerank_itc_scale, itm_eval_images) is not trained again; its export is scored again by "
                        "this code (the record marks it reused, with when it finished; its wall time and goodput are the "
                        "original run's)")
    args = parser.parse_args(argv)
    if args.reuse and not args.storage:
        parser.error("--reuse needs --storage (the directory of an earlier record's runs)")
    commit, load_before = git_commit(), os.getloadavg()[0]  # the code that runs: read before the first job
    started, start = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        storage = Path(args.storage).resolve() if args.storage else Path(scratch)
        runs = run(args.stage1_seeds, args.instruct_seeds, storage, args.set, args.reuse)
    options = [f"--stage1-seeds {','.join(map(str, args.stage1_seeds))}"] if args.stage1_seeds != [0] else []
    options += [f"--instruct-seeds {','.join(map(str, args.instruct_seeds))}"] if args.instruct_seeds != [0, 1, 2] else []
    options += [f"--set {override}" for override in args.set] + (["--reuse"] if args.reuse else [])
    record = {"command": " ".join(["python benchmarks/toy_runs.py", *options]),
              "commit": commit, "date": started.strftime("%Y-%m-%d %H:%M UTC"),
              "wall_seconds": round(time.perf_counter() - start), "machine": machine(),
              "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)], "runs": runs}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}; now `python benchmarks/readme_results.py` regenerates the README's block")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

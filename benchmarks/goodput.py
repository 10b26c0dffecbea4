"""Goodput of each training job: the job's samples/s over its own step's, side by side in one run.

    python benchmarks/goodput.py [--steps 60] [--set key=value ...] [--out FILE.json]

Runs the three toy training jobs one after the other on one local Ray instance, each from its shipped
config (``stage1_toy.yaml``: from the frozen-feature cache; ``stage2_toy.yaml``: into the toy OPT;
``instruct_toy.yaml``), with ``--steps`` optimiser steps instead of the config's budget; stage 2 starts
from this run's stage 1 and instruction tuning from its stage 2. Each job's ``report.json`` gives:

- **goodput**: the training loop's samples/s over its *own step's* samples/s — the same step (model,
  batch, text lengths, cached features or pixels) timed alone in the same worker process right after
  the job's last checkpoint (``goodput_probe_steps``);
- its wall time split into start-up, input check, feature cache, data wait, batch preparation, step,
  checkpointing, evaluation and export; the fixed costs' share is given as measured and as it would be
  at the config's full step budget (the loop's time scaled up, the fixed costs as measured).

``--set`` applies one override to all three jobs (e.g. ``--set scaling.torch_threads=1``), to compare
settings run against run. Absolute figures move with the machine's load; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from blip2.config import load_config
from blip2.training.goodput import FIXED_COSTS
from blip2.training.tasks import TASKS
from pipelines.common import CONFIG_DIR, OWN_CLUSTER_RUNTIME_ENV, quiet_progress_bars
from pipelines.toyworld import ToyWorldJobConfig, ensure_toyworld
from pipelines.train import DEFAULT_CONFIGS, fit

JOBS = ("stage1", "stage2", "instruct")


def run_job(stage: str, steps: int, world: Path, storage: Path, overrides: list[str]) -> dict:
    config_cls, _ = TASKS[stage]
    previous = {"stage2": [f"stage1={storage / 'stage1-toy'}"], "instruct": [f"stage2={storage / 'stage2-toy-opt'}"]}
    path = CONFIG_DIR / DEFAULT_CONFIGS[stage]
    config = load_config(config_cls, path, [f"toyworld={world}", f"storage_path={storage}", f"optim.max_steps={steps}",
                                            f"optim.warmup_steps={max(1, steps // 10)}", f"checkpoint_every={steps}",
                                            f"log_every={max(1, steps // 4)}", *previous.get(stage, []), *overrides])
    full_steps = load_config(config_cls, path, []).optim.max_steps
    report = json.loads((fit(stage, config) / "report.json").read_text())
    split = report["time_split"]
    seconds, goodput = split["seconds"], split["goodput"]
    fixed = sum(seconds[k] for k in FIXED_COSTS)
    loop = seconds["wall"] - fixed - seconds["probe"]
    full_loop = loop * full_steps / steps
    return {"steps": steps, "config_steps": full_steps,
            "global_batch": config.optim.batch_size * config.scaling.num_workers * config.optim.grad_accum_steps,
            "job_samples_per_s": goodput["samples_per_s"], "step_samples_per_s": goodput["step_samples_per_s"],
            "goodput": goodput["ratio"], "fixed_fraction": goodput["fixed_fraction"],
            "fixed_fraction_at_config_steps": round(fixed / (fixed + full_loop), 3),
            "seconds": seconds, "headline": report["headline"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per job (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for all three jobs (repeatable)")
    parser.add_argument("--jobs", default=",".join(JOBS), help="a prefix of stage1,stage2,instruct (each needs the one before)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    jobs = [j for j in args.jobs.split(",") if j]
    if jobs != list(JOBS[: len(jobs)]):
        parser.error("--jobs: stage1, then stage2, then instruct (each starts from the one before)")
    import ray

    quiet_progress_bars()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        world = Path(scratch) / "world"
        ensure_toyworld(ToyWorldJobConfig(out=str(world)))  # the jobs' own world, written before any job is timed
        ray.init(address="local", include_dashboard=False, log_to_driver=False,  # as `blip2 train` starts it
                 runtime_env=OWN_CLUSTER_RUNTIME_ENV)
        try:
            for stage in jobs:
                start = time.perf_counter()
                results[stage] = run_job(stage, args.steps, world, Path(scratch) / "runs", args.set)
                print(f"== {stage}: {time.perf_counter() - start:.0f}s", flush=True)
        finally:
            ray.shutdown()
    print(f"{'job':9s} {'job samples/s':>14s} {'step samples/s':>15s} {'goodput':>8s} {'fixed share':>12s} "
          f"{'at config steps':>16s}")
    for stage, r in results.items():
        print(f"{stage:9s} {r['job_samples_per_s']:14.1f} {r['step_samples_per_s']:15.1f} {r['goodput']:8.2f} "
              f"{r['fixed_fraction']:12.0%} {r['fixed_fraction_at_config_steps']:16.0%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": args.steps, "overrides": args.set, "load_average": os.getloadavg(),
                                              "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

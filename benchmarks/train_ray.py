"""Ray Train against a plain PyTorch loop, and the frozen-feature cache against recomputing features.

    python benchmarks/train_ray.py [--stage stage1] [--steps 40] [--batch-size 64] [--out FILE.json]

1. **Ray overhead**: the stage trained by the Ray Train job (``pipelines.train.fit``) with 2 workers of
   ``batch-size / 2`` each, against :func:`blip2.training.loop.train_locally` in this process with the
   whole ``batch-size`` — same model, same data (the toy world's WebDataset shards, decoded by Ray Data
   for the job and by a plain reader for the loop), same global batch, same optimiser. Throughput is
   samples per second between the first and the last step (start-up, evaluation and export excluded),
   so the ratio is what Ray Train + DDP + Ray Data streaming cost while training. Goal: >= 0.9.
   Both get the machine's cores: the loop as intra-op threads, the job as one thread per worker.
2. **Feature cache** (stage 1): one epoch of training from cached ``image_embeds`` against one epoch from
   pixels (which runs the frozen encoder every step), in this process, plus the one-time cost of
   computing the cache; the speed-up per epoch and the number of epochs after which the cache has paid
   for itself.

Both comparisons run side by side in one invocation: the machines are noisy, the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from blip2.config import load_config
from blip2.toyworld.corpus import ToyWorldConfig, iter_webdataset, write_toyworld
from blip2.toyworld.world import decode_image
from blip2.training.features import FrozenImageEncoder
from blip2.training.loop import train_locally
from blip2.training.tasks import TASKS
from pipelines.common import CONFIG_DIR, OWN_CLUSTER_RUNTIME_ENV
from pipelines.train import DEFAULT_CONFIGS, fit


def record_batches(shards: list[Path], batch_size: int, epoch: int) -> list[dict]:
    """Record batches as Ray Data's WebDataset reader gives them (decoded images, texts), shuffled per epoch."""
    records = list(iter_webdataset(shards))
    order = np.random.default_rng(epoch).permutation(len(records))
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [records[i] for i in order[start : start + batch_size]]
        batches.append({"jpg": np.stack([decode_image(r["jpg"]) for r in chunk]),
                        "txt": np.array([r["txt"] for r in chunk], dtype=object)})
    return batches


def throughput(history: list[dict], global_batch: int) -> float:
    steps = history[-1]["step"] - history[0]["step"]
    return global_batch * steps / (history[-1]["time"] - history[0]["time"])


def ray_vs_plain(stage: str, steps: int, batch_size: int, world: Path, world_config: ToyWorldConfig, storage: Path,
                 cores: int) -> dict:
    import ray

    sizes = [f"world.{split}_size={getattr(world_config, f'{split}_size')}"
             for split in ("web", "clean", "val", "test", "novel")]
    # the job's world is the one on disk (else the job would write its config's default world over it)
    base = [f"toyworld={world}", *sizes, f"optim.max_steps={steps}", "optim.warmup_steps=1",
            f"checkpoint_every={steps}", f"log_every={max(1, steps // 4)}", f"storage_path={storage}"]
    config_cls, task_cls = TASKS[stage]
    plain = load_config(config_cls, CONFIG_DIR / DEFAULT_CONFIGS[stage],
                        [*base, f"optim.batch_size={batch_size}", "scaling.num_workers=1",
                         f"scaling.torch_threads={cores}", "feature_cache=false"])
    torch.set_num_threads(cores)
    shards = sorted((world / "webdataset" / plain.train_split).glob("*.tar"))
    _, history = train_locally(task_cls(plain), lambda epoch: record_batches(shards, batch_size, epoch))
    plain_rate = throughput(history, batch_size)

    workers = 2
    distributed = load_config(config_cls, CONFIG_DIR / DEFAULT_CONFIGS[stage],
                              [*base, f"optim.batch_size={batch_size // workers}", f"scaling.num_workers={workers}",
                               f"scaling.cpus_per_worker={cores / workers / 2}",  # leave CPUs for Ray Data
                               f"scaling.torch_threads={max(1, cores // workers)}", "feature_cache=false",
                               "eval=[]",  # the ratio reads the training throughput only: no scoring after it
                               "name=bench-ray"])
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False,
             runtime_env=OWN_CLUSTER_RUNTIME_ENV)
    try:
        output = fit(stage, distributed)
    finally:
        ray.shutdown()
    report = json.loads((output / "report.json").read_text())
    ray_rate = report["samples_per_s"]
    return {"stage": stage, "steps": steps, "global_batch": batch_size, "workers": workers,
            "plain_samples_per_s": round(plain_rate, 1), "ray_samples_per_s": ray_rate,
            "ratio": round(ray_rate / plain_rate, 3)}


def feature_cache_speedup(batch_size: int, world: Path, cores: int) -> dict:
    torch.set_num_threads(cores)
    config_cls, task_cls = TASKS["stage1"]
    config = load_config(config_cls, CONFIG_DIR / DEFAULT_CONFIGS["stage1"],
                         [f"toyworld={world}", f"optim.batch_size={batch_size}", "optim.warmup_steps=1"])
    shards = sorted((world / "webdataset" / config.train_split).glob("*.tar"))
    pixel_batches = record_batches(shards, batch_size, 0)
    start = time.perf_counter()
    encoder = FrozenImageEncoder(task_cls(config).backbones.vision, threads=cores)
    cached_batches = [encoder(b) for b in pixel_batches]
    cache_seconds = time.perf_counter() - start
    epoch = {}
    for name, batches in (("pixels", pixel_batches), ("cached", cached_batches)):
        run = load_config(config_cls, CONFIG_DIR / DEFAULT_CONFIGS["stage1"],
                          [f"toyworld={world}", f"optim.batch_size={batch_size}", "optim.warmup_steps=1",
                           f"optim.max_steps={len(batches)}"])
        _, history = train_locally(task_cls(run), lambda e, b=batches: b)
        epoch[name] = history[-1]["time"]
    speedup = epoch["pixels"] / epoch["cached"]
    saved = epoch["pixels"] - epoch["cached"]
    return {"batches_per_epoch": len(pixel_batches), "epoch_s_pixels": round(epoch["pixels"], 2),
            "epoch_s_cached": round(epoch["cached"], 2), "cache_build_s": round(cache_seconds, 2),
            "speedup_per_epoch": round(speedup, 3),
            "break_even_epochs": round(cache_seconds / saved, 2) if saved > 0 else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="stage1", choices=["stage1", "stage2"])
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run (default 40)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    parser.add_argument("--clean-size", type=int, default=1000, help="toy-world clean split size (default 1000)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {cores} cores, torch "
                                f"{torch.__version__}"}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        world = scratch / "world"
        world_config = ToyWorldConfig(clean_size=args.clean_size, web_size=64, val_size=32, test_size=100,
                                      novel_size=32)
        write_toyworld(world_config, world)
        results["feature_cache"] = feature_cache_speedup(args.batch_size, world, cores)
        print("feature cache:", json.dumps(results["feature_cache"]), flush=True)
        results["ray_vs_plain"] = ray_vs_plain(args.stage, args.steps, args.batch_size, world, world_config,
                                               scratch / "runs", cores)
        print("ray vs plain:", json.dumps(results["ray_vs_plain"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step throughput of stage 1 and stage 2 on the toy preset, and FLOP utilisation.

    python benchmarks/train_step.py [--batch-size 32] [--steps 10] [--threads 0] [--out FILE.json]

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` records every matmul /
attention op of one forward + backward step. Utilisation is that count per second over this
machine's fp32 matmul peak, which the script measures first (2048 x 2048 matmuls, best of several).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer

from blip2.backbones.build import find_backbones
from blip2.backbones.vision import pixel_values
from blip2.models.presets import load_preset
from blip2.models.stage1 import Stage1Objective, build_stage1_model
from blip2.models.stage2 import Blip2Stage2, build_stage2_batch
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from blip2.toyworld.world import all_attributes, decode_image


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def measure(step: Callable[[], torch.Tensor], parameters: list[torch.nn.Parameter], steps: int,
            batch_size: int) -> dict[str, float]:
    """Time ``steps`` optimizer steps after two warm-up steps; count one step's FLOPs."""
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def one() -> None:
        loss = step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        one()
    counter = FlopCounterMode(display=False)
    with counter:
        one()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    seconds = (time.perf_counter() - start) / steps
    flops = counter.get_total_flops()
    return {"step_ms": seconds * 1e3, "samples_per_s": batch_size / seconds, "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / seconds / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})")

    backbones = find_backbones()
    records = generate_split(ToyWorldConfig(clean_size=args.batch_size), "clean")
    pixels = pixel_values(np.stack([decode_image(r.image) for r in records]))
    captions = [r.alt_text for r in records]
    results: dict[str, dict[str, float]] = {}

    stage1 = build_stage1_model(backbones.vision, backbones.qformer_tokenizer).train()  # the toy preset
    qformer_tokenizer = AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)
    text = qformer_tokenizer(captions, padding="max_length", max_length=24, return_tensors="pt")
    ids = torch.tensor([all_attributes().index(r.attributes) for r in records])
    objective = Stage1Objective()
    results["stage1"] = measure(lambda: objective(stage1, pixels, text.input_ids, text.attention_mask, ids).loss,
                                [p for p in stage1.parameters() if p.requires_grad], args.steps, args.batch_size)

    for preset in ("toy-opt", "toy-t5"):
        bundle = load_preset(preset)
        model = Blip2Stage2(bundle.model).train()
        batch = build_stage2_batch(bundle.tokenizer, bundle.model.config, pixels, captions)
        results[f"stage2-{preset.removeprefix('toy-')}"] = measure(
            lambda: model(**batch.model_inputs()).lm_loss, [p for _, p in model.trainable_parameters()], args.steps,
            args.batch_size)

    print(f"{'job':12s} {'samples/s':>10s} {'ms/step':>9s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for name, r in results.items():
        r["utilisation"] = r["achieved_gflops"] / peak
        print(f"{name:12s} {r['samples_per_s']:10.1f} {r['step_ms']:9.1f} {r['gflop_per_step']:11.2f} "
              f"{r['achieved_gflops']:8.1f} {r['utilisation']:8.1%}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"peak_gflops": peak, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                       "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

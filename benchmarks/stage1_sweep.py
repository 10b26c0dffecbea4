"""Stage-1 recipes compared on `val`, seed by seed: ITC and re-ranked retrieval, and ITM on right and wrong pairs.

    python benchmarks/stage1_sweep.py [RECIPE ...] [--base demo|toy] [--seeds 0,1,2] [--steps N]
                                      [--scales 1,50,150] [--out FILE]

A RECIPE is config overrides joined by ``+`` (``loss.itm_random_negatives=1+optim.learning_rate=2e-3``);
``base`` (the default) is the base config as it is. The base is the demo's stage-1 section
(``pipelines/configs/demo.yaml``, ``--base demo``) or the stage-1 toy config (``stage1_toy.yaml``, ``--base
toy``); ``--steps`` sets ``optim.max_steps`` (and the warm-up to a tenth of it). Each recipe trains once per
seed in this process, from the frozen image encoder's features of the ``clean`` split computed once (the
feature cache the jobs use), so a recipe costs its steps and nothing else: about a minute per 250 steps on two
cores. Its data order is this process's (a permutation per seed and epoch), not a Ray Train job's: the
figures compare recipes; a job's own figures come from its run.

Every model is scored on the toy world's ``val`` split only (``test`` and ``novel`` are never read: this is
where recipes, budgets and the re-rank's scale are chosen): text->image and image->text R@1 among
``--images`` images, attribute-level and strict, by ITC alone, by ITM alone over ITC's top 16 and by the
re-rank (ITM logit + scale x ITC cosine) for each ``--scales`` value; ITM pairwise and balanced accuracy
on ``--itm-images`` images' right, one-attribute-wrong and random captions. One JSON line per (recipe, seed)
is appended to ``--out`` and printed; a summary per recipe (mean and range over seeds) ends the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEPT = ("t2i_r1_attribute", "t2i_r1_strict", "i2t_r1_attribute", "i2t_r1_strict")
ITM = ("itm_pairwise_random", "itm_pairwise_one_attribute", "itm_balanced_random", "itm_balanced_one_attribute",
       "itm_right_accuracy")


def base_config(base: str, overrides: list[str]):
    from blip2.config import load_config
    from blip2.training.config import Stage1Config
    from pipelines.common import CONFIG_DIR
    from pipelines.demo import demo_stage1

    if base == "toy":
        return load_config(Stage1Config, CONFIG_DIR / "stage1_toy.yaml", overrides)
    return demo_stage1(overrides)


def cached_batches(config) -> list[dict]:
    """The ``clean`` split's frozen image features in batches of ``optim.batch_size`` (the feature cache)."""
    import numpy as np

    from blip2.toyworld.corpus import generate_split
    from blip2.toyworld.world import decode_image
    from blip2.training.features import FrozenImageEncoder
    from blip2.training.tasks import Stage1Task

    records = generate_split(config.world, config.train_split)
    encoder = FrozenImageEncoder(Stage1Task(config).backbones.vision)
    size = config.optim.batch_size
    return [encoder({"jpg": np.stack([decode_image(r.image) for r in records[s: s + size]]),
                     "txt": np.array([r.alt_text for r in records[s: s + size]], dtype=object)})
            for s in range(0, len(records) - size + 1, size)]


def batches_for(config, cache: dict[int, list[dict]]) -> list[dict]:
    """:func:`cached_batches` for ``config``'s batch size, computed once per size into ``cache``: a recipe
    may change ``optim.batch_size``, and the training loop takes its batches as they come."""
    size = config.optim.batch_size
    if size not in cache:
        cache[size] = cached_batches(config)
    return cache[size]


def score_on_val(model_dir: Path, task, world: Path, scales: list[float], images: int, itm_images: int) -> dict:
    """R@1 by ITC, ITM alone and the re-rank at each scale, and ITM's matching figures, on ``val``."""
    from pipelines.evaluate import EvaluateConfig, run

    row: dict = {}
    for n, scale in enumerate(scales):
        out = Path(tempfile.mkdtemp())
        metrics = run(EvaluateConfig(task="coco_retrieval", model=str(model_dir), toyworld=str(world), split="val",
                                     out=str(out), limit=images, num_actors=0, batch_size=50,
                                     tokenizer=str(task.backbones.qformer_tokenizer),
                                     image_processor=str(task.backbones.vision), rerank_k=task.config.rerank_k,
                                     rerank_itc_scale=scale, itm_images=itm_images if n == 0 else 0))["metrics"]
        if n == 0:
            row.update({f"{k}{s}": round(metrics[f"{k}{s}"], 3) for k in KEPT for s in ("_itc", "_itm")})
            row.update({k: round(metrics[k], 3) for k in ITM})
        row.update({f"{k}@{scale:g}": round(metrics[k], 3) for k in KEPT})
    return row


def sweep(recipes: list[str], base: str, seeds: list[int], steps: int | None, scales: list[float], images: int,
          itm_images: int, out_file: Path) -> list[dict]:
    import numpy as np
    import torch

    from blip2.models.export import export_stage1
    from blip2.toyworld.corpus import generate_split
    from blip2.toyworld.standard import write_standard_split
    from blip2.training.loop import train_locally
    from blip2.training.tasks import Stage1Task

    torch.set_num_threads(2)
    world = Path(tempfile.mkdtemp()) / "world"
    cached: dict[int, list[dict]] = {}  # the feature batches, per batch size (a recipe may change it)
    rows: list[dict] = []
    for recipe in recipes:
        for seed in seeds:
            overrides = [f"seed={seed}", "itm_diagnostics=false"]
            if steps:
                overrides += [f"optim.max_steps={steps}", f"optim.warmup_steps={steps // 10}"]
            overrides += [] if recipe == "base" else recipe.split("+")
            config = base_config(base, overrides)
            task = Stage1Task(config)
            if not cached:
                write_standard_split(generate_split(config.world, "val"), "val", world)
            batches = batches_for(config, cached)
            start = time.perf_counter()
            model, history = train_locally(task, lambda epoch: [
                batches[i] for i in np.random.default_rng([seed, epoch]).permutation(len(batches))])
            seconds = time.perf_counter() - start
            model_dir = Path(tempfile.mkdtemp()) / "model"
            export_stage1(model, model_dir)
            row = {"recipe": recipe, "base": base, "seed": seed, "steps": config.optim.max_steps,
                   "train_seconds": round(seconds),
                   "itm_loss_last": round(float(np.mean([h["itm_loss"] for h in history[-20:]])), 3),
                   **score_on_val(model_dir, task, world, scales, images, itm_images)}
            print(json.dumps(row), flush=True)
            with out_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


def summary(rows: list[dict], scales: list[float]) -> list[str]:
    """Per recipe: each figure's mean and [min, max] over its seeds."""
    lines = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        lines.append(f"{recipe} ({mine[0]['steps']} steps, seeds {','.join(str(r['seed']) for r in mine)})")
        names = ["t2i_r1_attribute_itc", "t2i_r1_attribute_itm",
                 *(f"t2i_r1_attribute@{s:g}" for s in scales), *ITM]
        for name in names:
            values = [r[name] for r in mine]
            lines.append(f"  {name:30s} {sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/stage1_sweep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", default=["base"], help="overrides joined by '+'; 'base': none")
    parser.add_argument("--base", choices=("demo", "toy"), default="demo")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=0, help="optim.max_steps (0: the base config's)")
    parser.add_argument("--scales", default="1,50,150", help="re-rank ITC scales scored on val")
    parser.add_argument("--images", type=int, default=100, help="val images ranked")
    parser.add_argument("--itm-images", type=int, default=200, help="val images whose caption pairs ITM scores")
    parser.add_argument("--out", default="runs/stage1_sweep.jsonl")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        parser.error("--seeds and --scales are comma-separated numbers")
    out_file = Path(args.out)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    rows = sweep(args.recipes, args.base, seeds, args.steps or None, scales, args.images, args.itm_images, out_file)
    print("\n".join(summary(rows, scales)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``blip2 toyworld``: write the toy-world corpus (WebDataset shards in img2dataset's layout + Parquet).

    python -m pipelines.toyworld --out data/toyworld --size 4000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from blip2.toyworld.corpus import SPLITS, ToyWorldConfig, read_manifest, write_toyworld
from pipelines.common import job_parser, log, parse_config


@dataclass(frozen=True)
class ToyWorldJobConfig:
    out: str = "runs/toyworld"
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    force: bool = False  # rewrite even when `out` already holds this exact corpus


def scaled(world: ToyWorldConfig, web_size: int) -> ToyWorldConfig:
    """``world`` with ``web_size`` web images and every other split scaled in proportion."""
    ratio = web_size / world.web_size if world.web_size else 1.0
    sizes = {f"{s}_size": max(1, round(world.split_size(s) * ratio)) if world.split_size(s) else 0 for s in SPLITS}
    return replace(world, **{**sizes, "web_size": web_size})


def ensure_toyworld(config: ToyWorldJobConfig) -> dict:
    """Write the corpus unless ``config.out`` already holds one made with the same settings; returns
    the manifest."""
    manifest = read_manifest(config.out)
    if manifest is not None and manifest["config"] == asdict(config.world) and not config.force:
        log(f"toy world: reusing {config.out} (same config; force=true rewrites it)")
        return manifest
    start = time.perf_counter()
    summary = write_toyworld(config.world, config.out)
    log(f"toy world: wrote {sum(summary.counts.values())} images to {config.out} "
        f"in {time.perf_counter() - start:.1f}s")
    return read_manifest(config.out)


def audit_corpus(root: str | Path) -> dict:
    """Read every WebDataset shard under ``root`` back with Ray Data and check it against its own ground
    truth: counts per split, the web split's noise mix, and the share of labels the pixels confirm."""
    import ray

    from blip2.toyworld.corpus import labels_agree

    def audit(batch: dict) -> dict:
        # Ray Data decodes <key>.jpg to an array and <key>.json to a dict; keep only small columns.
        metadata = list(batch["json"])
        return {
            "split": [m["split"] for m in metadata],
            "noise": [m["noise"] for m in metadata],
            "pixels_match_labels": [labels_agree(image, m) for image, m in zip(batch["jpg"], metadata)],
        }

    paths = [str(Path(root) / "webdataset" / split) for split in SPLITS]
    rows = ray.data.read_webdataset(paths).map_batches(audit, batch_size=256).take_all()  # Ray Data
    stats: dict = {"images": len(rows), "per_split": {}, "web_noise": {}}
    for split in SPLITS:
        stats["per_split"][split] = sum(r["split"] == split for r in rows)
    web = [r for r in rows if r["split"] == "web"]
    for kind in sorted({r["noise"] for r in web}):
        stats["web_noise"][kind] = sum(r["noise"] == kind for r in web) / max(len(web), 1)
    stats["pixels_match_labels"] = sum(r["pixels_match_labels"] for r in rows) / max(len(rows), 1)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("blip2 toyworld", __doc__, "toyworld.yaml")
    parser.add_argument("--out", help="output directory (same as out=DIR)")
    parser.add_argument("--size", type=int, help="number of web images; the other splits scale with it")

    def adjust(args: argparse.Namespace, overrides: list[str]) -> list[str]:
        return overrides + ([f"out={args.out}"] if args.out else [])

    config, args = parse_config(parser, ToyWorldJobConfig, argv, adjust)
    if args.size is not None:
        if args.size < 1:
            parser.error("--size must be >= 1")
        config = replace(config, world=scaled(config.world, args.size))
    manifest = ensure_toyworld(config)
    for split in SPLITS:
        log(f"  {split:6s} {manifest['counts'][split]:6d} images")
    noisy = {k: v for k, v in manifest["noise"].items() if k != "none"}
    total = sum(manifest["noise"].values())
    log(f"  web alt-texts wrong: {sum(noisy.values())}/{total} ({', '.join(f'{k} {v}' for k, v in noisy.items())})")
    log("  novel colour x shape pairs (absent from every other split): "
        + ", ".join(f"{c} {s}" for c, s in manifest["novel_pairs"]))
    if config.world.standard:
        log(f"  val/test/novel also in COCO captions, Karpathy, VQAv2 and GQA formats under {config.out}/standard "
            f"(blip2 evaluate reads them)")
    log(f"toy world done: {sum(manifest['counts'].values())} images in {config.out}: webdataset/, parquet/, "
        f"manifest.json" + (", standard/" if config.world.standard else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

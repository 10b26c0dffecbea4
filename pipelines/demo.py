"""``blip2 demo``: the embedded default, end to end on a local Ray instance.

What exists so far: generate the toy world, audit it with Ray Data (every shard read back, every label
checked against its pixels, the web noise measured), then load the frozen toy backbones through
``from_pretrained`` and measure them on held-out data. Later stages (CapFilt, training, serving) join
this command as they land. Each step's output is reused on a re-run unless ``force=true``.

    python -m pipelines.demo                 # writes runs/demo/{toyworld,report.json}
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blip2.backbones.build import evaluate_backbones, find_backbones, summary_lines
from blip2.config import to_dict
from blip2.toyworld.corpus import SPLITS, ToyWorldConfig
from pipelines.common import job_parser, log, parse_config
from pipelines.toyworld import ToyWorldJobConfig, ensure_toyworld


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    backbones: str = ""  # a backbone directory; empty = the set shipped in the package
    ray_address: str = ""  # empty = start a local Ray instance
    num_cpus: int = 0  # logical CPUs of the local instance; 0 = all
    force: bool = False  # redo steps whose output exists


def audit_corpus(root: Path) -> dict:
    """Read every WebDataset shard back with Ray Data and check it against its own ground truth."""
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

    paths = [str(root / "webdataset" / split) for split in SPLITS]
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
    import ray

    parser = job_parser("blip2 demo", __doc__, "demo.yaml")
    config, _ = parse_config(parser, DemoConfig, argv)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    report: dict = {"config": to_dict(config)}

    start = time.perf_counter()
    log("[1/3] toy world")
    ensure_toyworld(ToyWorldJobConfig(out=str(out / "toyworld"), world=config.world, force=config.force))
    timings["toyworld"] = time.perf_counter() - start

    start = time.perf_counter()
    log("[2/3] auditing the corpus with Ray Data")
    started = not ray.is_initialized()  # a caller (a test, a notebook) may already hold an instance
    if started:
        ray.init(address=config.ray_address or None, num_cpus=config.num_cpus or None,
                 include_dashboard=False, log_to_driver=False)  # Ray
    try:
        report["toyworld"] = audit_corpus(out / "toyworld")
    finally:
        if started:
            ray.shutdown()
    timings["audit"] = time.perf_counter() - start

    start = time.perf_counter()
    backbones = find_backbones(config.backbones or None)
    log(f"[3/3] measuring the frozen backbones at {backbones.root} on held-out data")
    report["backbones"] = evaluate_backbones(backbones, config.world.seed)
    timings["backbones"] = time.perf_counter() - start
    report["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    stats = report["toyworld"]
    log("")
    log("== results " + "=" * 60)
    log(f"toy world: {stats['images']} images  "
        + "  ".join(f"{s} {n}" for s, n in stats["per_split"].items()))
    log("web alt-texts: " + "  ".join(f"{k} {v:.1%}" for k, v in stats["web_noise"].items()))
    log(f"labels confirmed from pixels: {stats['pixels_match_labels']:.2%}")
    for line in summary_lines(report["backbones"]):
        log(line)
    log("seconds: " + "  ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    log(f"report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``blip2 backbones``: pretrain the toy world's frozen backbones (image encoder, OPT and T5 LMs) and
tokenizers, save them with ``save_pretrained`` and report their quality on held-out data.

    python -m pipelines.backbones --out runs/backbones

A set that already exists at ``--out`` is reused unless ``force=true``. The package ships a built set
(``blip2/assets/toy_backbones``); ``--evaluate`` re-measures a set instead of building one.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from blip2.backbones.build import BackbonesConfig, build_backbones, evaluate_backbones, find_backbones, summary_lines
from pipelines.common import job_parser, log, parse_config


@dataclass(frozen=True)
class BackbonesJobConfig:
    out: str = "runs/backbones"
    build: BackbonesConfig = field(default_factory=BackbonesConfig)
    force: bool = False  # rebuild even when `out` holds a set built with this config


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("blip2 backbones", __doc__, "backbones.yaml")
    parser.add_argument("--out", help="output directory (same as out=DIR)")
    parser.add_argument("--evaluate", metavar="DIR", nargs="?", const="",
                        help="evaluate the set at DIR (default: the shipped one) instead of building")

    def adjust(args: argparse.Namespace, overrides: list[str]) -> list[str]:
        return overrides + ([f"out={args.out}"] if args.out else [])

    config, args = parse_config(parser, BackbonesJobConfig, argv, adjust)
    if args.evaluate is not None:
        backbones = find_backbones(args.evaluate or None)
        log(f"evaluating the backbones at {backbones.root}")
        quality = evaluate_backbones(backbones, config.build.eval_toyworld_seed)
        for line in summary_lines(quality):
            log(line)
        log(f"backbones done: measured {backbones.root} on held-out data (nothing written)")
        return 0
    try:
        existing = find_backbones(config.out)
    except FileNotFoundError:
        existing = None
    if existing is not None and existing.is_complete_toy_set() and existing.report()["config"] == json.loads(json.dumps(asdict(config.build))) \
            and not config.force:
        log(f"backbones: reusing {existing.root} (built with this config; force=true rebuilds)")
        report, root, how = existing.report(), existing.root, "reused"
    else:
        start = time.perf_counter()
        backbones = build_backbones(config.build, config.out, log)
        report, root = backbones.report(), backbones.root
        how = f"built in {time.perf_counter() - start:.0f}s"
        log(f"backbones: {how} into {backbones.root}")
    for line in summary_lines(report):
        log(line)
    log(f"backbones done: {root} ({how}): vision/, qformer_tokenizer/, opt/, t5/, report.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``blip2 plan``: will a BLIP-2 / InstructBLIP job fit on my GPUs, at what batch, how long, how many
GPU-hours? The papers' models are built at their real sizes on the meta device (nothing is downloaded),
one step of each job runs on fake tensors with its FLOPs counted and its memory traced, and the
papers' schedules turn that into wall time at a fixed MFU.

    python -m pipelines.plan                                   # the papers' settings, 16x A100-40G
    python -m pipelines.plan presets=blip2-flan-t5-xxl gpu=h100-80g workers=8
    python -m pipelines.plan stages=[serve] gpu=l4 --json

Presets: blip2-opt-2.7b, blip2-opt-6.7b, blip2-flan-t5-xl, blip2-flan-t5-xxl, instructblip-vicuna-7b,
instructblip-flan-t5-xl. Stages: stage1, stage2, instruct, capfilt, serve. GPUs: a100-40g, a100-80g,
h100-80g, l4, a10g (or any with gpu_memory_gib= / gpu_tflops=). Each job takes seconds to a minute.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

from blip2.planning.config import PlanConfig
from blip2.planning.plan import plan_rows
from blip2.planning.table import format_table
from pipelines.common import job_parser, log, parse_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("blip2 plan", __doc__)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (one object per job)")
    config, args = parse_config(parser, PlanConfig, argv)
    # Progress goes to stderr so that `--json` output stays parseable.
    rows = plan_rows(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        json.dump({"config": dataclasses.asdict(config), "rows": [dataclasses.asdict(r) for r in rows]},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        log(format_table(rows, config))
    where = "stdout (JSON)" if args.json else "the table above"
    print(f"plan done: {len(rows)} job(s) on {config.workers}x {config.gpu} -> {where}; nothing written",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

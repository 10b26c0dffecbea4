"""The ``blip2`` command: one subcommand per job, each also runnable as ``python -m pipelines.<job>``
(which is what ``ray job submit --working-dir . -- python -m pipelines.<job> ...`` runs)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with main(argv), one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.demo", "run the embedded default end to end on a local Ray instance"),
    "toyworld": ("pipelines.toyworld", "write the toy-world corpus (WebDataset + Parquet shards)"),
    "backbones": ("pipelines.backbones", "pretrain / evaluate the toy world's frozen backbones"),
    "train": ("pipelines.train", "train on Ray Train: stage1, stage2 or instruct"),
    "serve": ("pipelines.serve", "serve a model on Ray Serve: caption, answer, match, embed, chat completions"),
    "capfilt": ("pipelines.capfilt", "clean a noisy image-text corpus with CapFilt on Ray Data"),
    "evaluate": ("pipelines.evaluate", "score a checkpoint on COCO / NoCaps / VQAv2 / OK-VQA / GQA (Ray Data)"),
    "plan": ("pipelines.plan", "plan a cluster run: memory, largest batch, FLOPs, time, GPU-hours"),
    "reproduce": ("pipelines.reproduce", "re-prove the papers' claims: arms x seeds as Ray trials -> CLAIMS.md"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="blip2", description="BLIP-2 / InstructBLIP from web corpus to served endpoint, on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {name:10s}  {text}" for name, (_, text) in SUBCOMMANDS.items())
               + "\n\n`blip2 <subcommand> --help` describes each one.",
    )
    parser.add_argument("subcommand", choices=SUBCOMMANDS, metavar="subcommand")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(SUBCOMMANDS[args.subcommand][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())

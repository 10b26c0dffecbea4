"""``<out>/demo_run.json``, the record of one ``blip2 demo`` run: the results table as printed, with the
commit, date, wall time and machine. benchmarks/demo_run.json has the same schema; the README's demo block
is generated from it (``python benchmarks/readme_results.py --demo-run <out>/demo_run.json`` records a new
full run)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def commit() -> str:
    """The checked-out commit (``+changes`` when tracked files differ from it), or "unknown" outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine(load_before: float) -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB memory, "
            f"load average {load_before:.1f} at the start; wall time of `blip2 demo`, Ray start-up included")


def run_record(lines: Sequence[str], reused: Sequence[str], wall_seconds: float, load_before: float) -> dict:
    """The record: ``lines`` is the results table as printed (without its title), ``reused`` the steps a
    previous run had finished (a record for the README needs none)."""
    return {"command": "blip2 demo", "commit": commit(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "wall_seconds": round(wall_seconds), "machine": machine(load_before), "split": "test",
            "reused": list(reused), "lines": list(lines)}

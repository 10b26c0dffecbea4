"""The training benchmark stays runnable (its figures come from running it by hand, not from here)."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def train_ray_command(directory: Path) -> list[str]:
    # its own process: the benchmark starts its own Ray instance
    return [sys.executable, str(BENCHMARKS / "train_ray.py"), "--steps", "3", "--batch-size", "8", "--clean-size", "64",
            "--out", str(directory / "train_ray.json")]


@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.early_process(command=train_ray_command)  # started as collection ends, run beside the other tests
def test_train_ray_benchmark_reports_both_ratios(early_process):
    code, output = early_process.wait(timeout=2400)  # from its start, early in the session
    assert code == 0, output[-4000:]
    results = json.loads((early_process.directory / "train_ray.json").read_text())
    cache, ray_run = results["feature_cache"], results["ray_vs_plain"]
    assert cache["batches_per_epoch"] == 8 and cache["speedup_per_epoch"] > 0 and cache["cache_build_s"] > 0
    assert ray_run["workers"] == 2 and ray_run["global_batch"] == 8
    assert ray_run["plain_samples_per_s"] > 0 and ray_run["ray_samples_per_s"] > 0 and ray_run["ratio"] > 0

"""The training benchmark stays runnable (its figures come from running it by hand, not from here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_train_ray_benchmark_reports_both_ratios(tmp_path):
    out = tmp_path / "train_ray.json"
    # its own process: the benchmark starts its own Ray instance
    result = subprocess.run([sys.executable, str(BENCHMARKS / "train_ray.py"), "--steps", "3", "--batch-size", "8",
                             "--clean-size", "64", "--out", str(out)], capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    results = json.loads(out.read_text())
    cache, ray_run = results["feature_cache"], results["ray_vs_plain"]
    assert cache["batches_per_epoch"] == 8 and cache["speedup_per_epoch"] > 0 and cache["cache_build_s"] > 0
    assert ray_run["workers"] == 2 and ray_run["global_batch"] == 8
    assert ray_run["plain_samples_per_s"] > 0 and ray_run["ray_samples_per_s"] > 0 and ray_run["ratio"] > 0

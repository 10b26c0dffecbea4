"""The benchmark scripts stay runnable (their figures are measured by running them, not here)."""

import json
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_train_step_benchmark_runs_and_reports_every_job(tmp_path, monkeypatch, capsys):
    out = tmp_path / "train_step.json"
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--steps", "1", "--batch-size", "4", "--out", str(out)])
    try:
        runpy.run_path(str(BENCHMARKS / "train_step.py"), run_name="__main__")
    except SystemExit as exit_info:
        assert exit_info.code == 0
    results = json.loads(out.read_text())
    assert results["peak_gflops"] > 0
    assert set(results["results"]) == {"stage1", "stage2-opt", "stage2-t5"}
    for job in results["results"].values():
        assert job["samples_per_s"] > 0 and job["gflop_per_step"] > 0 and 0 < job["utilisation"] < 1.5
    assert "of peak" in capsys.readouterr().out

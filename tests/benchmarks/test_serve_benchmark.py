"""The serving benchmark stays runnable (its figures are measured by running it, not here)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_serve_benchmark_reports_both_apps_at_every_concurrency(ray_local, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("serve_benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "serve.json"
    results = benchmark.main(["--requests", "8", "--rounds", "2", "--max-new-tokens", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    for app in ("batched", "unbatched"):
        for concurrency in ("1", "4", "16"):
            figures = results["apps"][app][concurrency]
            assert figures["errors"] == 0 and figures["requests_per_s"] > 0 and figures["p99_ms"] >= figures["p50_ms"] > 0
    assert results["batching_speedup_at_16"] > 0 and results["direct_p50_ms"] > 0
    assert results["http_overhead_p50_ms"] == pytest.approx(results["http_p50_ms"] - results["direct_p50_ms"])
    assert "batching speed-up at concurrency 16" in capsys.readouterr().out

"""The serving benchmark stays runnable (its figures are measured by running it, not here)."""

import json

import pytest

from tests.benchmarks import load_script


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_serve_benchmark_reports_every_app_at_every_concurrency(ray_local, tmp_path, capsys):
    benchmark = load_script("serve")
    out = tmp_path / "serve.json"
    results = benchmark.main(["--requests", "8", "--rounds", "1", "--concurrency", "1,4", "--lengths", "2,4",
                              "--presets", "toy-instruct-opt", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    toy = results["presets"]["toy-instruct-opt"]
    for app in ("continuous", "serve_batch", "batch1"):
        for concurrency in ("1", "4"):
            figures = toy["apps"][app][concurrency]
            assert figures["errors"] == 0 and figures["requests_per_s"] > 0 and figures["p99_ms"] >= figures["p50_ms"] > 0
            assert 0 < figures["ttft_p50_ms"] <= figures["p99_ms"] and figures["tokens_per_s"] > figures["requests_per_s"]
    assert toy["compared_at"] == 4 and toy["continuous_vs_batch1"] > 0 and toy["direct_p50_ms"] > 0
    assert toy["first_token"]["errors"] == 0 and 0 < toy["first_token"]["ratio"] <= 1 and toy["first_token"]["tokens"] == 4
    assert toy["http_overhead_p50_ms"] == pytest.approx(toy["http_p50_ms"] - toy["direct_p50_ms"])
    assert "continuous / @serve.batch" in capsys.readouterr().out

"""The CapFilt benchmark stays runnable (its figures come from running it, not from here)."""

import pytest

import benchmarks.capfilt as bench


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_capfilt_benchmark_runs_both_paths_and_they_agree(ray_local, tmp_path, one_thread):
    results = bench.benchmark(records=24, filter_source="toy-stage1", captions=1, threads=1, workdir=tmp_path)
    assert results["single_process"]["counts"]["input"] == results["ray"]["counts"]["input"] == 24
    assert results["single_process"]["images_per_s"] > 0 and results["ray"]["images_per_s"] > 0
    assert results["ratio"] == pytest.approx(results["ray"]["images_per_s"] / results["single_process"]["images_per_s"])

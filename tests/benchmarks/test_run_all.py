"""`benchmarks/run_all.py` runs the benchmark scripts and writes the results page from what they measured."""

import pytest

from tests.benchmarks import load_script


def load_runner():
    return load_script("run_all")


def test_the_page_quotes_what_a_benchmark_measured_and_how_to_rerun_it(tmp_path):
    runner = load_runner()
    page = tmp_path / "RESULTS.md"
    assert runner.main(["--quick", "--only", "train_step", "--out", str(page)]) == 0
    text = page.read_text()
    assert "Quick run" in text and "not measurements" in text  # a quick page says what it is
    assert "`python benchmarks/train_step.py --steps 2`" in text
    assert "share of the fp32 matmul peak" in text and "cores" in text and "torch" in text
    assert "| ok |" in text


def test_a_failed_benchmark_is_reported_not_hidden():
    runner = load_runner()
    records = {"capfilt": {"command": "python benchmarks/capfilt.py", "seconds": 1.0, "load_before": 0.5,
                           "load_after": 0.5, "returncode": 3}}
    text = runner.render(records, runner.machine(), quick=False, when="today")
    assert "FAILED (exit 3)" in text and "Quick run" not in text
    assert runner.summary_rows(records) == []  # no figure is made up for it


def test_unknown_benchmarks_are_refused(capsys):
    runner = load_runner()
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--only", "nope"])
    assert exit_info.value.code == 2
    assert "unknown benchmark(s) nope" in capsys.readouterr().err


def test_goodput_rows_give_each_job_its_ratio_and_the_machines_step_figure():
    runner = load_runner()
    job = {"goodput": 0.8, "job_samples_per_s": 80.0, "step_samples_per_s": 100.0, "steps": 60, "global_batch": 64,
           "fixed_fraction": 0.4, "fixed_fraction_at_config_steps": 0.12, "config_steps": 400}
    records = {"goodput": {"command": "python benchmarks/goodput.py", "results": {"results": {"stage1": job}}},
               "train_step": {"command": "python benchmarks/train_step.py",
                              "results": {"peak_gflops": 150.0, "results": {}}}}
    (row,) = runner.summary_rows(records)
    assert row[0] == "goodput, stage1: the job's samples/s / its own step's" and row[1] == "**0.80x**"
    assert "80 vs 100 samples/s" in row[3] and "12% at the config's 400 steps" in row[3]
    records["train_step"]["results"]["results"]["stage1"] = {"samples_per_s": 106.0, "utilisation": 0.5,
                                                             "gflop_per_step": 9.5}
    assert "train_step.py stage 1: 106 samples/s" in runner.summary_rows(records)[-1][3]

"""The README's benchmark figures equal the committed results page: CI fails when they drift apart."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load():
    spec = importlib.util.spec_from_file_location("readme_results", BENCHMARKS / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_benchmark_figures_equal_results_md(capsys):
    assert load().main(["--check"]) == 0, capsys.readouterr().err


def test_a_figure_that_differs_fails_the_check(tmp_path, monkeypatch, capsys):
    module = load()
    readme = tmp_path / "README.md"
    readme.write_text(module.README.read_text().replace("**0.97x**", "**0.99x**", 1))
    monkeypatch.setattr(module, "README", readme)
    assert module.main(["--check"]) == 1
    assert "readme_results.py" in capsys.readouterr().err
    assert module.main([]) == 0 and module.main(["--check"]) == 0  # regenerating puts it right

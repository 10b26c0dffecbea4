"""`blip2 demo`, the README's main command, end to end on a real local Ray instance (small world)."""

import json

import pytest

from pipelines import demo

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_demo_runs_end_to_end_and_reuses_its_outputs(tmp_path, ray_local, capsys):
    out = tmp_path / "demo"
    args = [f"out={out}", "world.web_size=200", "world.clean_size=40", "world.val_size=20", "world.test_size=100",
            "world.novel_size=30"]
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    stats = report["toyworld"]
    assert stats["per_split"] == {"web": 200, "clean": 40, "val": 20, "test": 100, "novel": 30}
    assert stats["pixels_match_labels"] == 1.0
    assert stats["web_noise"]["none"] == pytest.approx(0.65)
    assert report["backbones"]["vision"]["probe"]["test"]["mean"] >= 0.95
    assert report["backbones"]["opt"]["context_accuracy"] >= 0.9
    assert "labels confirmed from pixels: 100.00%" in printed and "linear probe on test" in printed

    assert demo.main(args) == 0  # a re-run reuses the written corpus
    assert "toy world: reusing" in capsys.readouterr().out

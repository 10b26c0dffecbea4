"""Stage 1 on a real local Ray instance: Ray Train workers, Ray Data input, checkpoints, resume."""

import json

import pytest

from pipelines import train

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def small(tmp_path, **extra):
    args = [f"storage_path={tmp_path / 'runs'}", f"toyworld={tmp_path / 'world'}", "world.web_size=40",
            "world.clean_size=64", "world.val_size=10", "world.test_size=32", "world.novel_size=10",
            "model.hidden_size=64", "model.num_layers=1", "model.image_text_hidden_size=32", "model.num_query_tokens=4",
            "optim.batch_size=16", "optim.warmup_steps=1", "eval_candidates=32", "checkpoint_every=3", "log_every=1",
            "scaling.cpus_per_worker=0.5"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def test_stage1_trains_checkpoints_and_resumes(tmp_path, ray_local):
    assert train.main(["stage1", *small(tmp_path, **{"optim.max_steps": 5})]) == 0
    out = tmp_path / "runs" / "stage1-toy"
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 5
    assert {"t2i_r1_attribute", "t2i_r1_strict"} <= set(report["eval"])
    assert (out / "curve.png").stat().st_size > 0
    assert (out / "model" / "model.safetensors").exists()

    # the same name again with a longer budget: resumes from the last checkpoint, step counter continuous
    assert train.main(["stage1", *small(tmp_path, **{"optim.max_steps": 8})]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 8 and report["final_losses"]["step"] == 8
    assert report["started_at"] == [0, 5]  # the second run picked up at the first run's last checkpoint


def test_two_workers_train_with_gathers(tmp_path, ray_local):
    args = small(tmp_path, **{"optim.max_steps": 3, "scaling.num_workers": 2, "name": "stage1-2w"})
    assert train.main(["stage1", *args]) == 0
    report = json.loads((tmp_path / "runs" / "stage1-2w" / "report.json").read_text())
    assert report["steps"] == 3 and report["config"]["scaling"]["num_workers"] == 2

"""``blip2 evaluate`` end to end on the toy world's standard-format sets: the real entrypoint, a real
Ray instance, untrained toy presets (the numbers are not the point; every record's path is)."""

import json

import pytest

from blip2.toyworld.corpus import ToyWorldConfig, write_toyworld
from blip2.toyworld.standard import image_name
from pipelines.evaluate import main

TINY = ToyWorldConfig(seed=5, web_size=8, clean_size=4, val_size=4, test_size=6, novel_size=4, parquet=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_world")
    write_toyworld(TINY, root)
    (root / "standard" / "images" / image_name("test", 1)).write_bytes(b"\xff\xd8 truncated jpeg")
    return root


def test_missing_checkpoint_or_dataset_is_a_clear_error_before_ray(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"model={tmp_path / 'nothing'}", f"toyworld={tmp_path}"])
    assert exit_info.value.code == 2
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["model=toy-opt", f"toyworld={tmp_path}"])
    assert f"run `blip2 toyworld --out {tmp_path}`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["task=coco_captions", "model=toy-opt", f"annotations={tmp_path / 'captions.json'}", f"images={tmp_path}"])
    assert "put a captions JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["model=blip2-opt-2.7b", f"toyworld={tmp_path}"])  # a hub name is not fetched
    assert "no checkpoint at blip2-opt-2.7b" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_questions_and_retrieval_through_ray_data(ray_local, world, tmp_path, one_thread):
    assert main(["task=vqav2", "model=toy-instruct-opt", f"toyworld={world}", f"out={tmp_path / 'vqa'}",
                 "generation.max_new_tokens=3", "batch_size=8"]) == 0
    report = json.loads((tmp_path / "vqa" / "metrics.json").read_text())
    metrics = report["metrics"]
    assert metrics["num_questions"] == 6 * 6 and metrics["unreadable_images"] == 6  # image 1's six questions
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "accuracy/question_type/existence" in metrics
    lines = [json.loads(line) for line in (tmp_path / "vqa" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 36 and sum(bool(line["error"]) for line in lines) == 6
    assert all(line["accuracy"] == 0.0 for line in lines if line["error"])  # scored as wrong, not dropped
    assert (tmp_path / "vqa" / "metrics.png").stat().st_size > 0

    assert main(["task=coco_retrieval", "model=toy-stage1", f"toyworld={world}", f"out={tmp_path / 'ret'}",
                 "rerank_k=3", "batch_size=8"]) == 0
    metrics = json.loads((tmp_path / "ret" / "metrics.json").read_text())["metrics"]
    assert metrics["num_images"] == 6 and metrics["num_texts"] == 36 and metrics["unreadable_images"] == 1
    for name in ("t2i_r1", "t2i_r10", "i2t_r1", "i2t_r10", "t2i_r1_itc", "r_mean"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["i2t_r10"] >= metrics["i2t_r5"] >= metrics["i2t_r1"]
    lines = (tmp_path / "ret" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 + 36


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("task", "model"), [("coco_captions", "toy-opt"), ("nocaps", "toy-t5"),
                                             ("okvqa", "toy-instruct-t5"), ("gqa", "toy-instruct-opt")])
def test_every_other_task(ray_local, world, tmp_path, one_thread, task, model):
    assert main([f"task={task}", f"model={model}", f"toyworld={world}", f"out={tmp_path}", "split=val",
                 "generation.max_new_tokens=4", "generation.num_beams=2"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    key = "cider_d" if task in ("coco_captions", "nocaps") else "accuracy"
    assert metrics[key] >= 0.0 and metrics["unreadable_images"] == 0

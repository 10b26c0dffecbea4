"""``blip2 evaluate`` end to end on the toy world's standard-format sets: the real entrypoint, a real
Ray instance, untrained toy presets (the numbers are not the point; every record's path is)."""

import json

import pytest

from blip2.toyworld.corpus import ToyWorldConfig, write_toyworld
from blip2.toyworld.standard import image_name
from pipelines.evaluate import EvaluateConfig, main, run_settings

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


MISSING = {  # task -> the files it reads: each, missing, is named with what belongs there
    "coco_retrieval": {"annotations": "coco_karpathy_test.json"},
    "coco_captions": {"annotations": "captions_val2014.json"},
    "nocaps": {"annotations": "nocaps_val_4500_captions.json"},
    "vqav2": {"questions": "v2_OpenEnded_mscoco_val2014_questions.json", "annotations": "v2_annotations.json"},
    "okvqa": {"questions": "OpenEnded_mscoco_val2014_questions.json", "annotations": "mscoco_val2014_annotations.json"},
    "gqa": {"questions": "testdev_balanced_questions.json"},
}


@pytest.mark.parametrize("task", sorted(MISSING))
def test_every_tasks_missing_files_are_named_with_what_to_put_there(task, world, tmp_path, capsys):
    standard = world / "standard"
    captions = task in ("coco_retrieval", "coco_captions", "nocaps")
    present = {"annotations": standard / ("coco_karpathy_test.json" if captions else "v2_mscoco_toytest_annotations.json"),
               "questions": standard / ("test_balanced_questions.json" if task == "gqa"
                                        else "v2_OpenEnded_mscoco_toytest_questions.json")}
    args = [f"task={task}", "model=toy-stage1" if task == "coco_retrieval" else "model=toy-instruct-opt"]
    for key, name in MISSING[task].items():  # each file missing in turn, the others present (the toy world's)
        paths = [f"{k}={present[k]}" for k in MISSING[task] if k != key] + [f"{key}={tmp_path / name}"]
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *paths, f"images={standard / 'images'}"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"missing {tmp_path / name}: put " in error and "nothing is downloaded" in error
    with pytest.raises(SystemExit):  # the image folder
        main([*args, *(f"{k}={present[k]}" for k in MISSING[task]), f"images={tmp_path / 'images'}"])
    assert f"missing directory {tmp_path / 'images'}: put " in capsys.readouterr().err


def test_retrieval_export_without_tokenizer_is_named_and_settings_come_from_the_run(tmp_path, capsys):
    model = tmp_path / "stage1" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["task=coco_retrieval", f"model={model}", f"annotations={tmp_path / 'k.json'}", f"images={tmp_path}"])
    error = capsys.readouterr().err
    assert f"{model} has no tokenizer_config.json: set tokenizer= to" in error and "qformer_tokenizer/" in error
    # beside a training report: its backbones' tokenizer and processor, its re-rank, its held-out families
    (model.parent / "report.json").write_text(json.dumps({"config": {
        "backbones": "", "rerank_k": 8, "rerank_itc_scale": 0.25, "tasks": {"colour": 0, "shape": 10}}}))
    config = run_settings(EvaluateConfig(task="coco_retrieval", model=str(model)))
    assert (config.rerank_k, config.rerank_itc_scale, config.held_out) == (8, 0.25, ("colour",))
    assert config.tokenizer.endswith("qformer_tokenizer") and config.image_processor.endswith("vision")
    config = run_settings(EvaluateConfig(task="coco_retrieval", model=str(model), rerank_itc_scale=0.0, rerank_k=3))
    assert (config.rerank_k, config.rerank_itc_scale) == (3, 0.0)  # given settings win
    plain = run_settings(EvaluateConfig(task="vqav2", model="toy-instruct-opt"))
    assert (plain.rerank_k, plain.rerank_itc_scale, plain.held_out) == (16, 1.0, ("existence",))  # the defaults


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_questions_and_retrieval_through_ray_data(ray_local, world, tmp_path, one_thread):
    assert main(["task=vqav2", "model=toy-instruct-opt", f"toyworld={world}", f"out={tmp_path / 'vqa'}",
                 "generation.max_new_tokens=3", "batch_size=8"]) == 0
    report = json.loads((tmp_path / "vqa" / "metrics.json").read_text())
    metrics = report["metrics"]
    assert metrics["num_questions"] == 6 * 6 and metrics["unreadable_images"] == 6  # image 1's six questions
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "accuracy/question_type/existence" in metrics
    # a toy world's copy: the toy-only metrics beside the standard ones
    assert metrics["accuracy/existence"] == metrics["accuracy/question_type/existence"]
    assert {"accuracy/held_in", "accuracy/held_out", "accuracy/all"} <= set(metrics) and metrics["num_examples"] == 36
    lines = [json.loads(line) for line in (tmp_path / "vqa" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 36 and sum(bool(line["error"]) for line in lines) == 6
    assert all(line["accuracy"] == 0.0 for line in lines if line["error"])  # scored as wrong, not dropped
    assert (tmp_path / "vqa" / "metrics.png").stat().st_size > 0

    assert main(["task=coco_retrieval", "model=toy-stage1", f"toyworld={world}", f"out={tmp_path / 'ret'}",
                 "rerank_k=3", "rerank_itc_scale=0.5", "limit=4", "batch_size=8"]) == 0
    metrics = json.loads((tmp_path / "ret" / "metrics.json").read_text())["metrics"]
    assert metrics["num_images"] == 4 and metrics["num_texts"] == 24 and metrics["unreadable_images"] == 1
    assert (metrics["rerank_k"], metrics["rerank_itc_scale"]) == (3, 0.5)
    for name in ("t2i_r1", "t2i_r10", "i2t_r1", "i2t_r10", "t2i_r1_itc", "t2i_r1_itm", "r_mean"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["i2t_r10"] >= metrics["i2t_r5"] >= metrics["i2t_r1"]
    assert metrics["t2i_r1_strict"] == metrics["t2i_r1"] and metrics["num_candidates"] == 4
    assert metrics["t2i_r1_attribute"] >= metrics["t2i_r1_strict"]
    assert metrics["itm_num_images"] == 6 and 0.0 <= metrics["itm_pairwise_one_attribute"] <= 1.0  # all six
    # what the re-rank did against ITC alone: R@1 moves by (fixed - broken) / queries, per level
    for direction, queries in (("t2i", 24), ("i2t", 4)):
        assert 0.0 <= metrics[f"{direction}_rerank_changed"] <= 1.0
        for counts, recall in (("", ""), ("_attribute", "_attribute"), ("_strict", "_strict")):
            fixed, broken = metrics[f"{direction}_rerank_fixed{counts}"], metrics[f"{direction}_rerank_broken{counts}"]
            assert metrics[f"{direction}_r1{recall}"] - metrics[f"{direction}_r1{recall}_itc"] == pytest.approx(
                (fixed - broken) / queries, abs=1e-6)
    lines = (tmp_path / "ret" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 + 24


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

"""The instruction mixture: sources in their published formats, sqrt(size) sampling with overrides,
held-out sources never trained on; the GPU config's mixture over tiny files laid out as it expects;
tuning on every format plus the toy world, then a held-out source scored zero-shot (no Ray)."""

import json
from collections import Counter

import numpy as np
import pytest
import yaml

from blip2.config import from_dict
from blip2.datasets.errors import DatasetError
from blip2.datasets.predict import SetPredictor, read_image
from blip2.datasets.tasks import load_task, score_questions
from blip2.models.generation import GenerationParams
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from blip2.toyworld.text import INSTRUCTION_TASKS
from blip2.training.config import InstructConfig, InstructionSource, Stage1Config, Stage1ModelConfig, Stage2Config
from blip2.training.loop import train_locally
from blip2.training.mixture import (
    EXAMPLE_JSON,
    check_source_files,
    draw_epoch,
    epoch_counts,
    example_records,
    example_skip_counts,
    load_source,
    mixture_probabilities,
    mixture_rows,
)
from blip2.training.tasks import InstructTask, Stage1Task, Stage2Task
from blip2.training.templates import eval_prompt
from pipelines.common import CONFIG_DIR
from tests.instruction_files import GPU_ROOT, write_instruction_files

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD = ToyWorldConfig(seed=3, web_size=40, clean_size=64, val_size=10, test_size=16, novel_size=10)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_instruction_files(tmp_path_factory.mktemp("datasets"), generate_split(WORLD, "val")[:6])


def gpu_sources(root) -> list[InstructionSource]:
    """instruct_gpu.yaml's sources, its datasets root moved to ``root``."""
    text = (CONFIG_DIR / "instruct_gpu.yaml").read_text().replace(GPU_ROOT, str(root))
    return list(from_dict(InstructConfig, yaml.safe_load(text)).sources)


def test_sqrt_size_sampling_with_per_source_weight_and_size_overrides():
    a, b = InstructionSource("a", "vqav2", images="x"), InstructionSource("b", "okvqa", images="x")
    assert mixture_probabilities([a, b], {"a": 400, "b": 100}) == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    b_weighed = InstructionSource("b", "okvqa", images="x", weight=40.0)  # weight replaces sqrt(size)
    assert mixture_probabilities([a, b_weighed], {"a": 400, "b": 100}) == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    b_sized = InstructionSource("b", "okvqa", images="x", size=1600)
    assert mixture_probabilities([a, b_sized], {"a": 400, "b": 100})["b"] == pytest.approx(2 / 3)
    held = InstructionSource("h", "gqa", images="x", held_out=True)
    assert "h" not in mixture_probabilities([a, b, held], {"a": 400, "b": 100})
    # one pass: the sum of sizes, split by probability; a streamed toy world passes whole, once
    assert epoch_counts({"a": 2 / 3, "b": 1 / 3}, {"a": 400, "b": 100}) == {"a": 333, "b": 167}
    assert epoch_counts({"toy": 0.5, "b": 0.5}, {"toy": 60, "b": 100}, streamed="toy") == {"toy": 60, "b": 60}
    assert epoch_counts({"a": 0.5, "b": 0.5}, {"a": 400, "b": 100}, epoch_size=10) == {"a": 5, "b": 5}
    # subsampled without replacement, repeated as evenly as possible
    rng = np.random.default_rng(0)
    assert len(set(draw_epoch(4, 10, rng).tolist())) == 4
    assert sorted(Counter(draw_epoch(25, 10, rng).tolist()).values()) == [2] * 5 + [3] * 5


@pytest.mark.parametrize("sources, toy_eval, message", [
    ([{"name": "v", "format": "vqav2", "images": "i", "questions": "q.json"},
      {"name": "h", "format": "vqav2", "images": "i", "questions": "q.json", "held_out": True}], False,
     "source 'h' is held out, but its file .*q.json is also trained on by source 'v'"),
    ([{"name": "h", "format": "gqa", "images": "i", "held_out": True}], False, "every source is held out"),
    ([{"name": "t", "format": "toyworld"}, {"name": "u", "format": "toyworld"}], True, "one toyworld"),
    ([{"name": "v", "format": "vqav2", "images": "i"}], True, "score the toy world's instruction families"),
    ([{"name": "l", "format": "llava", "images": "i", "held_out": True}, {"name": "t", "format": "toyworld"}], True,
     "no llava task"),
    ([{"name": "a", "format": "aokvqa", "images": "i", "task": "conversation"}], False, "multiple_choice or vqa"),
    ([{"name": "v", "format": "vqav2"}], False, "set images="),
])
def test_a_mixture_that_would_train_on_a_held_out_set_or_cannot_run_fails_at_start_up(sources, toy_eval, message):
    eval_sets = [{"task": "vqav2", "split": "test"}] if toy_eval else []
    with pytest.raises(ValueError, match=message):
        from_dict(InstructConfig, {"sources": sources, "eval": eval_sets})


def test_gpu_config_names_no_toy_family_and_builds_its_mixture_over_tiny_files_laid_out_the_same(files):
    text = (CONFIG_DIR / "instruct_gpu.yaml").read_text()
    assert not any(family in text for family in INSTRUCTION_TASKS if family not in ("describe", "size", "position"))
    assert "tasks:" not in text and "toyworld" not in text
    sources = gpu_sources(files)
    held_in = [s for s in sources if not s.held_out]
    assert {s.format for s in held_in} == {"karpathy", "vqav2", "okvqa", "aokvqa", "llava"}
    assert {s.name for s in sources if s.held_out} == {"gqa", "nocaps", "flickr30k"}
    check_source_files([s for s in sources if s.name != "flickr30k"])  # every file the layout names is read
    sizes = {s.name: len(load_source(s)) for s in held_in}
    assert sizes == {"coco_caption": 6, "vqav2": 6, "okvqa": 6, "aokvqa": 6, "llava_instruct": 6}
    probabilities = mixture_probabilities(sources, sizes)
    assert probabilities == pytest.approx({name: 0.2 for name in sizes})
    rows = mixture_rows(sources, epoch_counts(probabilities, sizes), seed=0)
    assert Counter(r["source"] for r in rows) == {name: 6 for name in sizes}
    tasks = {r["source"]: json.loads(r[EXAMPLE_JSON])["task"] for r in rows}
    assert tasks == {"coco_caption": "captioning", "vqav2": "vqa", "okvqa": "vqa", "aokvqa": "multiple_choice",
                     "llava_instruct": "conversation"}
    vqa = [json.loads(r[EXAMPLE_JSON]) for r in rows if r["source"] == "vqav2"]
    assert all(p["answer"] not in ("red ", "2") for p in vqa)  # the most common of the ten answers
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    assert len(example_records(batch)["image"]) == len(rows)  # every image read and decoded
    decoded = example_records(batch, image_size=32)["image"]  # decoded and resized once, as the toy world's
    assert decoded.shape == (len(rows), 32, 32, 3) and decoded.dtype == np.uint8
    rows[0]["path"] = str(files / "missing.jpg")
    counts = example_skip_counts({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    assert dict(zip(counts["reason"], counts["count"]))[f"{rows[0]['source']}:missing_image"] == 1


def test_a_test_split_without_answers_cannot_be_trained_on(files, tmp_path):
    entries = json.loads((files / "aokvqa" / "aokvqa_v1p0_train.json").read_text())
    for entry in entries:
        del entry["correct_choice_idx"]
    (tmp_path / "aokvqa_v1p0_test.json").write_text(json.dumps(entries))
    source = InstructionSource("aokvqa_test", "aokvqa", annotations=str(tmp_path / "aokvqa_v1p0_test.json"),
                               images=str(files / "coco" / "images" / "train2017"))
    with pytest.raises(DatasetError, match="'aokvqa_test': ChoiceQuestion aok1 has no answer to train on"):
        load_source(source)


@pytest.fixture(scope="module")
def stage2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    stage1 = Stage1Task(Stage1Config(world=WORLD, model=Stage1ModelConfig(hidden_size=64, num_layers=1,
                                                                           image_text_hidden_size=32, num_query_tokens=4)))
    stage1.export(stage1.build_model(), out / "stage1" / "model")
    stage2 = Stage2Task(Stage2Config(world=WORLD, stage1=str(out / "stage1"), llm="opt"))
    stage2.export(stage2.build_model(), out / "stage2" / "model")
    (out / "stage2" / "report.json").write_text(json.dumps({"config": {"stage1": str(out / "stage1")}}))
    return out / "stage2"


def test_tunes_on_every_format_plus_the_toy_world_and_scores_a_held_out_source_zero_shot(files, stage2_dir, tmp_path):
    sources = [*gpu_sources(files)[:5], InstructionSource("toyworld", "toyworld"),
               *[s for s in gpu_sources(files) if s.name == "gqa"]]
    config = InstructConfig(world=WORLD, stage2=str(stage2_dir), sources=tuple(sources),
                            optim=from_dict(InstructConfig, {"optim": {"max_steps": 12, "batch_size": 8,
                                                                       "warmup_steps": 2}}).optim)
    toy = generate_split(WORLD, "clean")[:12]
    sizes = {s.name: len(load_source(s)) for s in sources[:5]} | {"toyworld": len(toy)}
    probabilities = mixture_probabilities(sources, sizes)
    rows = mixture_rows(sources, epoch_counts(probabilities, sizes, streamed="toyworld"), seed=0)
    files_part = example_records({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    toy_part = {"image": np.array([r.image for r in toy], dtype=object),
                "captions_json": np.array([json.dumps([r.alt_text]) for r in toy], dtype=object),
                EXAMPLE_JSON: np.array([""] * len(toy), dtype=object)}
    records = {k: np.concatenate([files_part[k], toy_part[k]]) for k in toy_part}
    # the toy world's 12 records pass once; each 6-example source gets sqrt(6 / 12) of that: 8.5 -> 8
    assert len(records["image"]) == 12 + 5 * 8

    task = InstructTask(config)
    pairs = task.draw_examples(records, np.random.default_rng(0))
    assert len(pairs) == len(records["image"]) and all(i and a for i, a in pairs)

    def batches(epoch):
        order = np.random.default_rng(epoch).permutation(len(records["image"]))
        for start in range(0, len(order) - 7, 8):
            yield {k: v[order[start:start + 8]] for k, v in records.items()}

    model, history = train_locally(task, batches)
    assert len(history) == 12 and all(np.isfinite(h["lm_loss"]) for h in history)
    assert np.mean([h["lm_loss"] for h in history[-3:]]) < np.mean([h["lm_loss"] for h in history[:3]])
    export = task.export(model, tmp_path / "model")
    # the held-out source, zero-shot: never among the rows, scored with its own metric (GQA exact match)
    gqa = next(s for s in sources if s.held_out)
    assert not any(r["path"].startswith(gqa.images) for r in rows)
    questions = load_task("gqa", images=gqa.images, questions=gqa.questions)
    predictor = SetPredictor(str(export), retrieval=False, params=GenerationParams(max_new_tokens=3))
    prompt = eval_prompt(gqa.task_type)
    answers = predictor.generate([read_image(str(q.path)) for q in questions],
                                 [prompt.format(q.question) for q in questions])
    metrics = score_questions("gqa", answers, questions)
    assert metrics["num_questions"] == 6 and 0 <= metrics["accuracy"] <= 1


def test_the_toy_world_alone_draws_exactly_as_before_with_or_without_the_mixture_columns(stage2_dir):
    """The toy config runs the mixture's code: its records carry no example, so every instruction comes
    from the families, drawn as they always were (the same generator calls, the same pairs)."""
    toy = generate_split(WORLD, "clean")[:16]
    task = InstructTask(InstructConfig(world=WORLD, stage2=str(stage2_dir), sources=(InstructionSource("t", "toyworld"),)))
    plain = {"image": np.array([r.image for r in toy], dtype=object),
             "captions_json": np.array([json.dumps([r.alt_text]) for r in toy], dtype=object)}
    expected = task.draw_tasks([r.alt_text for r in toy], np.random.default_rng(5))
    assert task.draw_examples(plain, np.random.default_rng(5)) == expected
    assert task.draw_examples({**plain, EXAMPLE_JSON: np.array([""] * 16, dtype=object)},
                              np.random.default_rng(5)) == expected

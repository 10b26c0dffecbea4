"""The three training stages behind one interface, without Ray: batches from every input layout, a
training step that moves only what trains and an export the next stage loads (held-out evaluation is
``blip2 evaluate``'s, tests/pipelines/test_evaluate.py)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from blip2.models.export import import_pretrained, import_stage1
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from blip2.toyworld.text import INSTRUCTION_TASKS
from blip2.toyworld.world import decode_image
from blip2.training.config import (
    InstructConfig,
    OptimConfig,
    Stage1Config,
    Stage1LossConfig,
    Stage1ModelConfig,
    Stage2Config,
    TaskSizes,
)
from blip2.training.data import sample_captions, task_mixture
from blip2.training.records import CAPTIONS_JSON, batch_images, caption_choices, training_records
from blip2.training.features import FrozenImageEncoder
from blip2.training.loop import train_locally
from blip2.training.tasks import InstructTask, Stage1Task, Stage2Task, resolve_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = ToyWorldConfig(seed=3, web_size=40, clean_size=64, val_size=10, test_size=16, novel_size=10)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def records():
    return generate_split(WORLD, "clean")[:8]


def layouts(records):
    """The same records as each reader yields them: WebDataset (decoded), Parquet (bytes + text) and
    CapFilt output (bytes + a list of kept captions)."""
    texts = np.array([r.alt_text for r in records], dtype=object)
    return {
        "webdataset": {"jpg": np.stack([decode_image(r.image) for r in records]), "txt": texts},
        "parquet": {"image": np.array([r.image for r in records], dtype=object), "text": texts},
        "capfilt": {"image": np.array([r.image for r in records], dtype=object),
                    "captions": np.array([np.array([r.alt_text, r.alt_text.upper()]) for r in records], dtype=object)},
    }


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    task = Stage1Task(Stage1Config(world=WORLD, model=Stage1ModelConfig(hidden_size=64, num_layers=1,
                                                                         image_text_hidden_size=32, num_query_tokens=4)))
    out = tmp_path_factory.mktemp("stage1")
    task.export(task.build_model(), out / "model")
    return out


def trainable_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_every_input_layout_gives_the_same_stage1_batch(records):
    task = Stage1Task(Stage1Config(world=WORLD))
    batches = {name: task.make_batch(b, np.random.default_rng(0)) for name, b in layouts(records).items()}
    reference = batches["webdataset"]
    for name in ("parquet",):
        for key in reference:
            assert torch.equal(batches[name][key], reference[key]), (name, key)
    # CapFilt records carry two captions: each is drawn for some record with enough draws
    drawn = {text for seed in range(20)
             for text in sample_captions(caption_choices(layouts(records)["capfilt"]), np.random.default_rng(seed))}
    assert {r.alt_text for r in records} | {r.alt_text.upper() for r in records} == drawn


def test_every_layout_brought_to_the_training_columns_gives_the_same_batch(records):
    """What the training job reads from each source (a mix of sources reads the same way)."""
    task = Stage1Task(Stage1Config(world=WORLD))
    for name, batch in layouts(records).items():
        normalised = training_records(batch)
        assert set(normalised) == {"image", CAPTIONS_JSON}
        expected, got = (task.make_batch(b, np.random.default_rng(0)) for b in (batch, normalised))
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)


def test_missing_columns_are_named():
    with pytest.raises(KeyError, match="caption column"):
        caption_choices({"image": []})


def test_task_mixture_is_proportional_to_the_square_root_of_size():
    mixture = task_mixture({"a": 100, "b": 400, "c": 0})
    assert mixture == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    with pytest.raises(ValueError):
        task_mixture({"a": 0})


def test_stage1_step_trains_and_cached_features_give_the_same_loss(records):
    task = Stage1Task(Stage1Config(world=WORLD, model=Stage1ModelConfig(hidden_size=64, num_layers=1,
                                                                         image_text_hidden_size=32, num_query_tokens=4)))
    model = task.build_model()
    batch = layouts(records)["webdataset"]
    inputs = task.make_batch(batch, np.random.default_rng(0))
    cached = task.make_batch(FrozenImageEncoder(task.backbones.vision)(batch), np.random.default_rng(0))
    assert "image_embeds" in cached and "pixel_values" not in cached
    model.eval()  # no dropout: the two losses must agree exactly up to float error
    losses = [task.step_module(model, 0, 1, CPU)(**x) for x in (inputs, cached)]
    for name in ("itc_loss", "itm_loss", "lm_loss"):
        assert losses[0][name].item() == pytest.approx(losses[1][name].item(), rel=1e-5)
    frozen = {n: p.detach().clone() for n, p in model.vision_model.named_parameters()}
    losses[0]["loss"].backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert model.query_tokens.grad is not None
    assert all(torch.equal(p, frozen[n]) for n, p in model.vision_model.named_parameters())


def test_itm_weight_schedule_holds_then_ramps_over_shares_of_the_steps():
    loss = Stage1LossConfig(itm_weight=1.0, itm_weight_start=10.0, itm_weight_hold=0.5, itm_weight_ramp=0.25)
    assert [loss.itm_weight_at(s, 100) for s in (0, 49, 50, 60, 75, 99)] == pytest.approx([10, 10, 10, 6.4, 1, 1])
    assert [loss.itm_weight_at(s, 8) for s in (0, 3, 4, 6)] == pytest.approx([10, 10, 10, 1])  # same shape
    assert Stage1LossConfig(itm_weight=3.0).itm_weight_at(0, 100) == 3.0  # no schedule: the weight throughout
    for bad in ({"itm_weight_start": -1.0}, {"itm_weight_hold": 0.8, "itm_weight_ramp": 0.3}):
        with pytest.raises(ValueError):
            Stage1LossConfig(**bad)



def test_random_negative_share_goes_from_easy_to_hard_over_its_ramp_and_reaches_the_objective():
    loss = Stage1LossConfig(itm_random_negatives=1.0, itm_random_negatives_end=0.0, itm_random_negatives_ramp=0.5)
    assert [loss.itm_random_negatives_at(s, 100) for s in (0, 25, 50, 99)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert Stage1LossConfig(itm_random_negatives=0.3).itm_random_negatives_at(99, 100) == 0.3  # no schedule
    for bad in ({"itm_random_negatives_end": 1.5}, {"itm_random_negatives_ramp": 0.0}):
        with pytest.raises(ValueError):
            Stage1LossConfig(**bad)
    config = Stage1Config(world=WORLD, model=Stage1ModelConfig(hidden_size=64, num_layers=1, image_text_hidden_size=32,
                                                               num_query_tokens=4),
                          optim=OptimConfig(max_steps=4, warmup_steps=0, batch_size=8), loss=loss)
    task = Stage1Task(config)
    task.step_module(task.build_model(), 0, 1, CPU)
    shares = []
    for step in range(4):
        task.before_step(step)
        shares.append(task._objective.itm_random_negatives)
    assert shares == pytest.approx([1.0, 0.5, 0.0, 0.0])

def test_training_follows_the_itm_weight_schedule_step_by_step(records):
    """The weight each optimiser step used is in the history, and the loss is ITC + that weight * ITM + ITG."""
    config = Stage1Config(world=WORLD, model=Stage1ModelConfig(hidden_size=64, num_layers=1, image_text_hidden_size=32,
                                                               num_query_tokens=4),
                          optim=OptimConfig(max_steps=4, warmup_steps=0, batch_size=8), itm_diagnostics=False,
                          loss=Stage1LossConfig(itm_weight=1.0, itm_weight_start=5.0, itm_weight_hold=0.5))
    _, history = train_locally(Stage1Task(config), lambda epoch: [layouts(records)["webdataset"]])
    assert [h["itm_weight"] for h in history] == [5.0, 5.0, 1.0, 1.0]
    for h in history:
        assert h["loss"] == pytest.approx(h["itc_loss"] + h["itm_weight"] * h["itm_loss"] + h["lm_loss"], rel=1e-5)
    ablated = Stage1Task(dataclasses.replace(config, loss=Stage1LossConfig(itc_weight=0.5, itg_weight=0.0)))
    ablated.step_module(ablated.build_model(), 0, 1, CPU)  # the config's weights reach the objective
    assert (ablated._objective.itc_weight, ablated._objective.itg_weight) == (0.5, 0.0)


def test_itm_diagnostics_run_on_the_steps_the_job_logs_and_leave_training_alone(records):
    """The diagnostics' extra ITM pass runs on the first, every ``log_every``-th and the last step only, and
    the training it watches is the same as without it."""
    config = Stage1Config(world=WORLD, model=Stage1ModelConfig(hidden_size=64, num_layers=1, image_text_hidden_size=32,
                                                               num_query_tokens=4),
                          optim=OptimConfig(max_steps=5, warmup_steps=0, batch_size=8), log_every=2)
    _, history = train_locally(Stage1Task(config), lambda epoch: [layouts(records)["webdataset"]])
    assert [h["step"] for h in history if "itm_acc_positive" in h] == [1, 2, 4, 5]
    _, plain = train_locally(Stage1Task(dataclasses.replace(config, itm_diagnostics=False)),
                             lambda epoch: [layouts(records)["webdataset"]])
    assert not any("itm_acc_positive" in h for h in plain)
    assert [h["loss"] for h in plain] == pytest.approx([h["loss"] for h in history], rel=1e-6)


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_stage2_starts_from_stage1_and_trains_only_the_bridge(records, stage1_dir, tmp_path, llm):
    task = Stage2Task(Stage2Config(world=WORLD, stage1=str(stage1_dir), llm=llm))
    model = task.prepare(task.build_model(), CPU, mixed_precision=True)
    stage1 = import_stage1(stage1_dir / "model")
    assert torch.equal(model.model.query_tokens, stage1.query_tokens)  # the Q-Former came from stage 1
    step = task.step_module(model, 0, 1, CPU)
    step.train()
    assert not model.model.language_model.training and not model.model.vision_model.training
    out = step(**task.make_batch(layouts(records)["capfilt"], np.random.default_rng(0)))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith(("model.query_tokens", "model.qformer.", "model.language_projection."))
                           for n in trained)
    exported = import_pretrained(task.export(model, tmp_path / "model"))
    assert type(exported.model).__name__ == "Blip2ForConditionalGeneration"


def test_stage2_from_a_fresh_qformer_is_a_switch(stage1_dir):
    """``qformer_from_stage1=false`` (default true): same Q-Former shape as stage 1's, fresh weights."""
    assert Stage2Config().qformer_from_stage1
    stage1 = import_stage1(stage1_dir / "model")
    fresh = Stage2Task(Stage2Config(world=WORLD, stage1=str(stage1_dir), qformer_from_stage1=False)).build_model()
    assert fresh.model.query_tokens.shape == stage1.query_tokens.shape
    assert not torch.equal(fresh.model.query_tokens, stage1.query_tokens)
    ours = dict(fresh.model.qformer.named_parameters())
    theirs = dict(stage1.qformer.named_parameters())
    name = "encoder.layer.0.attention.attention.query.weight"
    assert ours[name].shape == theirs[name].shape and not torch.equal(ours[name], theirs[name])


def test_instruct_starts_from_stage2_with_held_out_families(records, stage1_dir, tmp_path):
    stage2 = Stage2Task(Stage2Config(world=WORLD, stage1=str(stage1_dir), llm="opt"))
    stage2.export(stage2.build_model(), tmp_path / "stage2" / "model")
    (tmp_path / "stage2" / "report.json").write_text(json.dumps({"config": {"stage1": str(stage1_dir)}}))
    task = InstructTask(InstructConfig(world=WORLD, stage2=str(tmp_path / "stage2"),
                                       tasks=TaskSizes(colour=10, shape=0, size=0, position=0, describe=0,
                                                                     verify=0)))
    model = task.build_model()
    # only colour questions are drawn, answered from the attributes each caption states
    pairs = task.draw_tasks([r.alt_text for r in records], np.random.default_rng(0))
    assert [answer for _, answer in pairs] == [r.attributes.colour for r in records]
    inputs = task.make_batch(layouts(records)["parquet"], np.random.default_rng(0))
    assert inputs["qformer_input_ids"].shape[0] == len(records)  # the instruction enters the Q-Former
    out = task.step_module(model, 0, 1, CPU)(**inputs)
    out["loss"].backward()
    assert model.model.qformer.embeddings.word_embeddings.weight.grad is not None
    # every family but colour (and existence, held out by default) had size 0: held out, evaluated zero-shot
    assert task.config.tasks.held_out() == tuple(t for t in INSTRUCTION_TASKS if t != "colour")
    exported = import_pretrained(task.export(model, tmp_path / "instruct" / "model"))
    assert exported.is_instruct


def test_a_missing_previous_stage_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run that job first"):
        resolve_model_dir(tmp_path / "nowhere", "stage 1")
    with pytest.raises(FileNotFoundError, match="stage 2"):
        InstructTask(InstructConfig(world=WORLD, stage2=str(tmp_path)))


def test_records_without_a_caption_are_dropped_not_fatal(records):
    batch = layouts(records)["parquet"]
    batch["text"] = np.array(["", *[r.alt_text for r in records[1:-1]], None], dtype=object)
    kept = training_records(batch)
    assert len(kept[CAPTIONS_JSON]) == len(records) - 2  # images decoded once, here
    assert np.array_equal(kept["image"], batch_images({"jpg": [r.image for r in records[1:-1]]}, kept["image"].shape[1]))
    assert caption_choices(kept) == [[r.alt_text] for r in records[1:-1]]
    with pytest.raises(ValueError, match="no caption"):
        caption_choices(batch)


def test_feature_cache_of_capfilt_output_keeps_every_caption_parquet_safe(records):
    task = Stage1Task(Stage1Config(world=WORLD))
    batch = layouts(records)["capfilt"]
    cached = FrozenImageEncoder(task.backbones.vision)(batch)
    assert cached[CAPTIONS_JSON].dtype == object and isinstance(cached[CAPTIONS_JSON][0], str)  # no pickled lists
    assert caption_choices(cached) == caption_choices(batch)
    assert caption_choices(FrozenImageEncoder(task.backbones.vision)(training_records(batch))) == caption_choices(batch)


def test_an_instruction_unaware_qformer_is_a_switch_the_export_keeps(records, stage1_dir, tmp_path):
    """``qformer_instruction=false`` (InstructBLIP's Table 3 ablation): the Q-Former is given an empty
    instruction in training batches and, read from the exported config, when the export answers
    (``generate_answers``, blip2 evaluate's / Serve's runtime, Serve's continuous decoder); the LLM still
    gets the instruction."""
    from blip2.datasets.predict import SetPredictor
    from blip2.images import load_image as read_image_bytes
    from blip2.models.generation import GenerationParams, decode, generate_answers, generate_ids
    from blip2.models.instruct import encode_qformer_instructions, instruction_aware
    from blip2.serving.decoding import ContinuousDecoder
    from blip2.serving.requests import GenerationRequest

    assert InstructConfig().qformer_instruction
    stage2 = Stage2Task(Stage2Config(world=WORLD, stage1=str(stage1_dir), llm="opt"))
    stage2.export(stage2.build_model(), tmp_path / "stage2" / "model")
    (tmp_path / "stage2" / "report.json").write_text(json.dumps({"config": {"stage1": str(stage1_dir)}}))
    tasks = {"stage2": str(tmp_path / "stage2"), "world": WORLD}
    aware, unaware = InstructTask(InstructConfig(**tasks)), InstructTask(InstructConfig(**tasks, qformer_instruction=False))
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    batch = layouts(records)["parquet"]
    aware.build_model()
    model = unaware.build_model()
    told, blind = aware.make_batch(batch, rng()), unaware.make_batch(batch, rng())
    assert torch.equal(told["input_ids"], blind["input_ids"])  # the same instructions reach the LLM
    empty, _ = encode_qformer_instructions(unaware.qformer_tokenizer, [""] * len(records), None)
    assert torch.equal(blind["qformer_input_ids"], empty) and told["qformer_input_ids"].shape[1] > empty.shape[1]
    exported = import_pretrained(unaware.export(model, tmp_path / "instruct" / "model"))
    assert not instruction_aware(exported.model.config)
    assert json.loads((tmp_path / "instruct" / "model" / "config.json").read_text())["qformer_instruction"] is False
    pixels = unaware._pixels(batch)[:2]
    questions = ["what colour is the shape?", "name the shape."]
    ids, mask = encode_qformer_instructions(unaware.qformer_tokenizer, ["", ""], None)
    told_ids, told_mask = encode_qformer_instructions(unaware.qformer_tokenizer, questions, None)
    seen = []  # what the Q-Former is given when the export answers (the real model, observed)

    def observe(model):
        image_features = model.get_image_features

        def observed(*args, **kwargs):
            seen.append(kwargs["qformer_input_ids"].cpu())
            return image_features(*args, **kwargs)

        model.get_image_features = observed

    predictor = SetPredictor(str(tmp_path / "instruct" / "model"), retrieval=False)  # blip2 evaluate's and Serve's path
    observe(predictor.runtime.bundle.model)
    predictor.generate([read_image_bytes(r.image) for r in records[:2]], questions)
    decoder = ContinuousDecoder(predictor.runtime)  # Serve's continuous batching, on the same runtime
    for question, record in zip(questions, records[:2]):
        decoder.submit(GenerationRequest(read_image_bytes(record.image), question, GenerationParams(max_new_tokens=2)))
    while decoder.has_work():
        decoder.step()
    observe(exported.model)
    answers = generate_answers(exported.model, exported.tokenizer, pixels, questions,
                               qformer_tokenizer=exported.qformer_tokenizer)
    assert len(seen) == 3 and all(torch.equal(s, ids) for s in seen) and not torch.equal(ids, told_ids[:, : ids.shape[1]])
    expected = generate_ids(exported.model, exported.tokenizer, pixels, questions, qformer_input_ids=ids,
                            qformer_attention_mask=mask)
    assert answers == decode(exported.tokenizer, expected)

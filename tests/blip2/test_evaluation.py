"""Held-out evaluation: pure scoring checked against oracle and wrong inputs, and the evaluate_* functions
run end to end on tiny untrained models (keys, ranges, determinism) and on oracle generators that read
the answer off the pixels (so a mix-up between images, questions and ground truth cannot pass)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from blip2 import evaluation
from blip2.backbones.build import find_backbones
from blip2.backbones.vision import IMAGE_MEAN, IMAGE_STD
from blip2.evaluation import (
    InstructionItem,
    caption_references,
    draw_instructions,
    evaluate_captions,
    evaluate_instructions,
    evaluate_retrieval,
    retrieval_relevance,
    score_answers,
    score_captions,
    score_retrieval,
)
from blip2.matching import evaluate_matching
from blip2.models.generation import GenerationParams
from blip2.models.presets import load_preset
from blip2.models.scoring import rerank_with_itm, retrieve
from blip2.models.stage1 import build_stage1_model
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from blip2.toyworld.text import INSTRUCTION_TASKS, InstructionExample, caption, parse_attributes
from blip2.toyworld.world import ATTRIBUTES, Attributes, read_attributes

SHORT = GenerationParams(max_new_tokens=10)
RECALL_NAMES = {f"{d}_r{k}_{level}" for d in ("t2i", "i2t") for k in (1, 5) for level in ("strict", "attribute")}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records():
    return generate_split(ToyWorldConfig(seed=1, test_size=24), "test")


@pytest.fixture(scope="module")
def stage1():
    backbones = find_backbones()
    torch.manual_seed(0)
    model = build_stage1_model(backbones.vision, backbones.qformer_tokenizer, num_query_tokens=4,
                               image_text_hidden_size=32, hidden_size=64, num_layers=1, num_heads=4,
                               intermediate_size=128)
    return model, AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)


def distinct_attributes(n: int) -> list[Attributes]:
    """n attribute sets, each differing in every attribute from the next (cyclically, for the n used here)."""
    return [Attributes(*(values[i % len(values)] for values in ATTRIBUTES.values())) for i in range(n)]


def attributes_from_pixels(pixel_values: torch.Tensor) -> list[Attributes]:
    """What the images show, read off the (normalised) pixels: the ground truth an oracle may use."""
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    images = ((pixel_values.float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return [read_attributes(image.permute(1, 2, 0).numpy()) for image in images]


# ---------------------------------------------------------------------------------------------------
# Retrieval


def test_score_retrieval_with_oracle_and_wrong_rankings():
    attributes = distinct_attributes(6)
    attributes[1] = attributes[0]  # images 0 and 1 look alike: either fits caption 0 or 1
    captions = [caption(a, i % 6) for i, a in enumerate(attributes)]
    oracle = torch.stack([torch.arange(6).roll(-i) for i in range(6)])  # row i: i, i+1, ... (item i first)
    scores = score_retrieval(oracle, oracle, captions, attributes)
    assert set(scores) == RECALL_NAMES and all(v == 1.0 for v in scores.values())

    # Swap the look-alikes: strictly wrong for rows 0 and 1, right at the attribute level.
    swapped = oracle.clone()
    swapped[[0, 1], 0] = torch.tensor([1, 0])
    scores = score_retrieval(swapped, swapped, captions, attributes)
    assert scores["t2i_r1_strict"] == scores["i2t_r1_strict"] == pytest.approx(4 / 6)
    assert scores["t2i_r1_attribute"] == scores["i2t_r1_attribute"] == 1.0

    # Each row's paired item ranked last (attributes all differ apart from the look-alikes' pair).
    wrong = torch.stack([torch.arange(6).roll(-i - 1) for i in range(6)])
    scores = score_retrieval(wrong, wrong, captions, attributes)
    assert scores["t2i_r5_strict"] == scores["i2t_r5_strict"] == 0.0
    assert scores["t2i_r1_attribute"] == pytest.approx(1 / 6)  # caption 0's first pick is image 1, alike
    assert scores["t2i_r5_attribute"] == pytest.approx(2 / 6)  # ... and caption 1's top 5 holds image 0


def test_image_to_text_needs_a_caption_stating_the_image_exactly():
    attributes = distinct_attributes(3)
    partial = f"something {attributes[0].colour}"  # true of image 0, but not its description
    relevance = retrieval_relevance([partial, caption(attributes[1]), caption(attributes[2])], attributes)
    assert relevance["t2i_attribute"][0, 0]  # the image has what the caption states
    assert not relevance["i2t_attribute"][0, 0]  # but the caption does not describe the image
    assert torch.equal(relevance["i2t_attribute"][1:, 1:], torch.eye(2, dtype=torch.bool))
    assert torch.equal(relevance["i2t_strict"], torch.eye(3, dtype=torch.bool))


def test_evaluate_retrieval(stage1, records):
    model, tokenizer = stage1
    model.train()
    metrics = evaluate_retrieval(model, tokenizer, records, num_candidates=20, rerank_k=4, batch_size=7)
    assert model.training  # the caller's mode is restored
    assert set(metrics) == (RECALL_NAMES | {f"{n}_itc" for n in RECALL_NAMES} | {f"{n}_itm" for n in RECALL_NAMES}
                            | {"num_candidates", "rerank_k"})
    assert metrics["num_candidates"] == 20 and metrics["rerank_k"] == 4
    assert all(0.0 <= metrics[n] <= 1.0 for n in metrics if n not in ("num_candidates", "rerank_k"))
    for name in RECALL_NAMES:
        if name.endswith("_attribute"):
            strict = name.replace("_attribute", "_strict")
            assert metrics[name] >= metrics[strict] and metrics[name + "_itc"] >= metrics[strict + "_itc"]
    assert evaluate_retrieval(model, tokenizer, records, num_candidates=20, rerank_k=4, batch_size=5) == metrics

    # k = 1 re-ranks nothing: the numbers are the ITC ranking's.
    single = evaluate_retrieval(model, tokenizer, records, num_candidates=20, rerank_k=1, batch_size=7)
    assert all(single[n] == single[n + "_itc"] == single[n + "_itm"] for n in RECALL_NAMES)
    assert evaluate_retrieval(model, tokenizer, records, num_candidates=100)["num_candidates"] == len(records)


def test_evaluate_matching_scores_three_pairs_per_image(stage1, records):
    model, tokenizer = stage1
    model.train()
    metrics = evaluate_matching(model, tokenizer, records, num_images=12, batch_size=5)
    assert model.training  # the caller's mode is restored
    assert metrics["itm_num_images"] == 12
    assert {"itm_pairwise_random", "itm_balanced_random", "itm_pairwise_one_attribute",
            "itm_balanced_one_attribute", "itm_right_accuracy"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "itm_num_images")
    assert evaluate_matching(model, tokenizer, records, num_images=12, batch_size=12) == metrics


def test_batched_rerank_is_scorings_retrieve(stage1, records):
    model, tokenizer = stage1
    model.eval()
    text = tokenizer([r.alt_text for r in records[:10]], padding="longest", return_tensors="pt")
    image_embeds = model.encode_images(evaluation._pixels(records[:10]))
    with torch.no_grad():
        similarity = model.itc_similarity(model.image_features(image_embeds),
                                          model.text_features(text.input_ids, text.attention_mask))
    for k in (1, 4, 10):
        expected = retrieve(model, image_embeds, text.input_ids, text.attention_mask, k=k)
        got = rerank_with_itm(model, image_embeds, text.input_ids, text.attention_mask, similarity, k, batch_size=3)
        assert torch.equal(got.text_to_image, expected.text_to_image)
        assert torch.equal(got.image_to_text, expected.image_to_text)


# ---------------------------------------------------------------------------------------------------
# Captions


def test_score_captions_with_oracle_and_wrong_captions():
    attributes = distinct_attributes(10)
    oracle = [caption(a, i % 6) for i, a in enumerate(attributes)]  # right, in varied phrasings
    scores = score_captions(oracle, attributes, num_examples=3)
    assert scores["caption_accuracy"] == 1.0
    assert all(scores[f"attribute_accuracy/{name}"] == 1.0 for name in ATTRIBUTES)
    assert scores["bleu4"] == pytest.approx(1.0) and scores["cider_d"] > 5.0
    assert scores["num_images"] == 10
    assert scores["examples"] == [{"caption": oracle[i], "truth": caption(attributes[i])} for i in range(3)]

    shifted = oracle[1:] + oracle[:1]  # every caption describes another image
    wrong = score_captions(shifted, attributes)
    assert wrong["caption_accuracy"] == 0.0 and wrong["cider_d"] < scores["cider_d"] / 2
    assert all(wrong[f"attribute_accuracy/{name}"] == 0.0 for name in ATTRIBUTES)
    assert caption_references(attributes[0])[0] == caption(attributes[0])


@pytest.fixture(scope="module")
def toy_opt():
    return load_preset("toy-opt")


def test_evaluate_captions(toy_opt, records):
    metrics = evaluate_captions(toy_opt.model, toy_opt.tokenizer, records[:12], params=SHORT, batch_size=5)
    assert {"caption_accuracy", "bleu4", "cider_d", "num_images", "examples",
            *(f"attribute_accuracy/{name}" for name in ATTRIBUTES)} == set(metrics)
    assert metrics["num_images"] == 12 and len(metrics["examples"]) == 5
    assert all(0.0 <= metrics[n] <= 1.0 for n in metrics if n not in ("cider_d", "num_images", "examples"))
    assert metrics["cider_d"] >= 0.0
    assert evaluate_captions(toy_opt.model, toy_opt.tokenizer, records[:12], params=SHORT, batch_size=12) == metrics
    with pytest.raises(ValueError, match="one caption per image"):
        evaluate_captions(toy_opt.model, toy_opt.tokenizer, records, GenerationParams(num_beams=2,
                                                                                      num_return_sequences=2))


def test_evaluate_captions_scores_each_caption_against_its_own_image(monkeypatch, records):
    def oracle(model, tokenizer, pixel_values, prompts=None, params=None, seed=None, max_text_length=None):
        return [caption(a, 3) for a in attributes_from_pixels(pixel_values)]

    monkeypatch.setattr(evaluation, "generate_captions", oracle)
    metrics = evaluate_captions(torch.nn.Linear(1, 1), None, records, batch_size=7)  # 24 = 7 + 7 + 7 + 3
    assert metrics["caption_accuracy"] == 1.0 and metrics["bleu4"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------
# Instructions


def oracle_answer(instruction: str, attributes: Attributes) -> str:
    """The right answer, a description phrased unlike the reference (template 1, not 0)."""
    asked = parse_attributes(instruction)
    if asked:  # yes/no: "is the shape red?" (verify), "is there a red circle?" (existence)
        return "yes" if all(getattr(attributes, name) == value for name, value in asked.items()) else "no"
    for task in ("colour", "shape", "size", "position"):
        if instruction in INSTRUCTION_TASKS[task]:
            return getattr(attributes, task)
    assert instruction in INSTRUCTION_TASKS["describe"]
    return caption(attributes, 1)


def test_draw_instructions_is_seeded_per_family(records):
    items = draw_instructions(records, examples_per_task=5, seed=3)
    assert len(items) == 5 * len(INSTRUCTION_TASKS) and items == draw_instructions(records, examples_per_task=5, seed=3)
    assert [i.record for i in items[:5]] == list(range(5))
    # A subset of families asks them the same questions; another seed asks others.
    assert draw_instructions(records, ("existence",), 5, seed=3) == items[-5:]
    assert draw_instructions(records, examples_per_task=5, seed=4) != items
    with pytest.raises(ValueError, match="distinct families"):
        draw_instructions(records, ("colour", "colour"))


def test_score_answers_with_oracle_and_wrong_answers(records):
    items = draw_instructions(records, examples_per_task=12, seed=0)
    oracle = [oracle_answer(i.example.instruction, i.attributes) for i in items]
    scores = score_answers(oracle, items)
    assert all(scores[f"accuracy/{t}"] == 1.0 for t in (*INSTRUCTION_TASKS, "all", "held_in", "held_out"))
    # The describe answers are right but phrased unlike the reference: exact match would call them wrong.
    assert scores["describe_exact_match"] == 0.0
    assert scores["num_examples"] == len(items) and len(scores["examples"]) == len(INSTRUCTION_TASKS)
    assert all(example["correct"] for example in scores["examples"])

    others = items[1:] + items[:1]  # each answer is another image's
    wrong = score_answers([oracle_answer(i.example.instruction, i.attributes) for i in others], items)
    assert wrong["accuracy/describe"] <= 1 / 12 and wrong["accuracy/all"] < 0.6
    describe = InstructionItem(0, Attributes("circle", "red", "small", "left"),
                               InstructionExample("describe", "describe the image.", "a small red circle on the left"))
    assert score_answers(["a small red or blue circle on the left"], [describe])["accuracy/describe"] == 0.0


@pytest.fixture(scope="module")
def toy_instruct():
    return load_preset("toy-instruct-opt")


def test_evaluate_instructions(toy_instruct, records):
    bundle = toy_instruct
    args = (bundle.model, bundle.tokenizer, bundle.qformer_tokenizer, records)
    metrics = evaluate_instructions(*args, examples_per_task=4, params=SHORT, batch_size=10)
    accuracies = {f"accuracy/{t}" for t in (*INSTRUCTION_TASKS, "all", "held_in", "held_out")}
    assert set(metrics) == accuracies | {"describe_exact_match", "num_examples", "examples"}
    assert metrics["num_examples"] == 4 * len(INSTRUCTION_TASKS)
    assert all(0.0 <= metrics[n] <= 1.0 for n in accuracies)
    assert evaluate_instructions(*args, examples_per_task=4, params=SHORT, batch_size=24) == metrics

    held_in = evaluate_instructions(*args, tasks=("colour", "size"), examples_per_task=4, params=SHORT)
    assert "accuracy/held_out" not in held_in and held_in["accuracy/held_in"] == held_in["accuracy/all"]


def test_evaluate_instructions_scores_each_answer_against_its_own_question(monkeypatch, records):
    def oracle(model, tokenizer, pixel_values, instructions, params=None, qformer_tokenizer=None, seed=None,
               max_qformer_length=None, max_text_length=None):
        return [oracle_answer(q, a) for q, a in zip(instructions, attributes_from_pixels(pixel_values), strict=True)]

    monkeypatch.setattr(evaluation, "generate_answers", oracle)
    metrics = evaluate_instructions(torch.nn.Linear(1, 1), None, None, records, examples_per_task=10, batch_size=7)
    assert metrics["accuracy/all"] == 1.0 and metrics["num_examples"] == 10 * len(INSTRUCTION_TASKS)

"""Instruction templates per task type and the answer each type trains on."""

from pathlib import Path

import numpy as np
import pytest

from blip2.datasets.captions import CaptionedImage
from blip2.datasets.instructions import ChoiceQuestion, Conversation
from blip2.datasets.questions import VisualQuestion
from blip2.training.templates import (
    TASK_TYPES,
    check_templates,
    eval_prompt,
    example_payload,
    format_example,
    load_templates,
    most_common_answer,
)

PATH = Path("x.jpg")


def test_shipped_templates_are_instructblips_with_ten_or_more_per_type_but_conversation():
    templates = load_templates()
    assert set(templates) == set(TASK_TYPES)
    assert templates["captioning"][0] == "<Image>A short image caption:"
    assert "<Image>Question: {question} Short answer:" in templates["vqa"]
    assert all(len(templates[t]) >= 10 for t in ("captioning", "vqa", "multiple_choice"))
    # the held-out sets are evaluated with LAVIS's zero-shot prompts
    assert eval_prompt("vqa") == "Question: {} Short answer:"
    assert eval_prompt("captioning") == "A short image caption:"


@pytest.mark.parametrize("templates, message", [
    ({"captioning": ["A caption:"]}, "must start with <Image>"),
    ({"vqa": ["<Image>Question: Short answer:"]}, r"uses \[\]; expected \['question'\]"),
    ({"multiple_choice": ["<Image>{question} {choices}"]}, "uses"),
    ({"captioning": ["<Image>A {caption"]}, "captioning template"),
    ({"conversation": []}, "needs a list of templates"),
])
def test_a_wrong_template_is_named(templates, message):
    good = dict(load_templates())
    with pytest.raises(ValueError, match=message):
        check_templates({**good, **templates})


def test_most_common_human_answer_after_vqa_normalisation_ties_to_the_first():
    assert most_common_answer(["Two", "2", "2 ", "three", "3", "3"]) == "2"
    assert most_common_answer(["cab", "taxi", "taxi", "cab"]) == "cab"
    with pytest.raises(ValueError):
        most_common_answer([])


def test_each_task_type_formats_its_instruction_and_answer():
    rng = np.random.default_rng(0)
    caption = example_payload("captioning", CaptionedImage("1", PATH, ("a dog on a bed", "a sleeping dog")))
    seen = {format_example(caption, rng)[1] for _ in range(40)}
    assert seen == {"a dog on a bed", "a sleeping dog"}  # one of the references, drawn
    instructions = {format_example(caption, rng)[0] for _ in range(200)}
    assert len(instructions) >= 10 and all("<Image>" not in i for i in instructions)

    vqa = example_payload("vqa", VisualQuestion("q", "1", PATH, "How many dogs?", ("Two", "2", "3")))
    instruction, answer = format_example(vqa, rng)
    assert answer == "2" and "How many dogs?" in instruction

    choice = ChoiceQuestion("q", "1", PATH, "What is he awaiting?", ("train", "cab"), 1, ("taxi", "cab", "cab"))
    instruction, answer = format_example(example_payload("multiple_choice", choice), rng)
    assert answer == "cab" and "train, cab" in instruction and "What is he awaiting?" in instruction
    assert format_example(example_payload("vqa", choice), rng)[1] == "cab"  # direct answers, most common

    talk = example_payload("conversation", Conversation("c", PATH, (("What colour?", "Red."), ("Why?", "Paint."))))
    assert {format_example(talk, rng) for _ in range(30)} == {("What colour?", "Red."), ("Why?", "Paint.")}


def test_an_item_that_cannot_be_the_task_is_refused():
    with pytest.raises(ValueError, match="cannot be a captioning example"):
        example_payload("captioning", Conversation("c", PATH, (("a", "b"),)))

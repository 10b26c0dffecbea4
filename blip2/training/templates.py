"""Instruction templates per task type, and the answer each type trains on.

The templates live in ``instruction_templates.json`` beside this module (InstructBLIP's, per task type:
captioning, short-answer VQA, multiple choice, conversation). A training example is a small JSON-safe
dict (what travels through Ray Data with its image, see :func:`example_payload`); :func:`format_example`
draws a template and turns it into ``(instruction, answer)``:

- **captioning**: a caption template; the answer is one of the image's reference captions, drawn anew
  each time;
- **vqa**: the question in a VQA template; the answer is the most common human answer
  (:func:`most_common_answer`, VQA's normalisation, so "Two" and "2 " count as one);
- **multiple_choice**: the question and its options; the answer is the correct option's text;
- **conversation**: one (human, gpt) turn of the conversation, drawn; the human turn is the instruction
  (InstructBLIP uses LLaVA-Instruct's questions as they are) and gpt's reply the answer.
"""

from __future__ import annotations

import functools
import json
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blip2.datasets.captions import CaptionedImage
from blip2.datasets.instructions import ChoiceQuestion, Conversation
from blip2.datasets.questions import VisualQuestion
from blip2.vqa_accuracy import normalise_vqa_answer

TEMPLATES_FILE = Path(__file__).with_name("instruction_templates.json")
TASK_TYPES: tuple[str, ...] = ("captioning", "vqa", "multiple_choice", "conversation")
IMAGE = "<Image>"
_FIELDS = {"captioning": set(), "vqa": {"question"}, "multiple_choice": {"question", "options"},
           "conversation": {"question"}}


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_templates(templates: Mapping[str, Sequence[str]], source: str = "templates") -> dict[str, tuple[str, ...]]:
    """``templates`` as tuples, or a ``ValueError`` naming the first one that is wrong: every task type
    has at least one template, each starts with ``<Image>`` and uses exactly its type's placeholders."""
    result = {}
    for task in TASK_TYPES:
        entries = templates.get(task)
        if not entries or not all(isinstance(t, str) for t in entries):
            raise ValueError(f"{source}: task type {task!r} needs a list of templates")
        for template in entries:
            if not template.startswith(IMAGE) or IMAGE in template[len(IMAGE):]:
                raise ValueError(f"{source}: {task} template {template!r} must start with {IMAGE} (and name it once): "
                                 f"the model reads the image first")
            try:
                fields = _placeholders(template)
            except ValueError as error:
                raise ValueError(f"{source}: {task} template {template!r}: {error}") from error
            if fields != _FIELDS[task]:
                raise ValueError(f"{source}: {task} template {template!r} uses {sorted(fields)}; expected "
                                 f"{sorted(_FIELDS[task])}")
        result[task] = tuple(entries)
    return result


@functools.cache
def load_templates(path: str | Path = TEMPLATES_FILE) -> dict[str, tuple[str, ...]]:
    """The templates of ``path`` (default: the shipped InstructBLIP set), checked."""
    return check_templates(json.loads(Path(path).read_text(encoding="utf-8")), str(path))


def fill(template: str, question: str = "", options: Sequence[str] = ()) -> str:
    """The instruction text of ``template`` (``<Image>`` removed: the image always comes first)."""
    return template[len(IMAGE):].format(question=question, options=", ".join(options)).strip()


def eval_prompt(task: str, templates: Mapping[str, Sequence[str]] | None = None) -> str:
    """The first template of ``task`` as ``blip2 evaluate`` takes a prompt (``{}`` for the question)."""
    template = (templates or load_templates())[task][0]
    return fill(template.replace("{question}", "{{}}"))


def most_common_answer(answers: Sequence[str]) -> str:
    """The answer most annotators gave, compared after VQA's normalisation; a tie goes to the answer given
    first. Returned normalised (lower case, numbers as digits), as VQA accuracy compares it."""
    if not answers:
        raise ValueError("no answers to choose from")
    normalised = [normalise_vqa_answer(a) for a in answers]
    counts = Counter(normalised)
    best = max(counts.values())
    return next(a for a in normalised if counts[a] == best)


def example_payload(task: str, item: Any) -> dict[str, Any]:
    """What a training example of ``task`` needs from a loaded ``item``, as a JSON-safe dict."""
    if task == "captioning" and isinstance(item, CaptionedImage):
        return {"task": task, "captions": list(item.captions)}
    if task == "vqa" and isinstance(item, VisualQuestion):
        return {"task": task, "question": item.question, "answer": most_common_answer(item.answers)}
    if task == "vqa" and isinstance(item, ChoiceQuestion):  # A-OKVQA's direct answers
        return {"task": task, "question": item.question, "answer": most_common_answer(item.direct_answers)}
    if task == "multiple_choice" and isinstance(item, ChoiceQuestion):
        if item.correct < 0:
            raise ValueError("its correct choice is not given")
        return {"task": task, "question": item.question, "choices": list(item.choices),
                "answer": item.choices[item.correct]}
    if task == "conversation" and isinstance(item, Conversation):
        return {"task": task, "turns": [list(t) for t in item.turns]}
    raise ValueError(f"a {type(item).__name__} cannot be a {task} example")


def format_example(payload: Mapping[str, Any], rng: np.random.Generator,
                   templates: Mapping[str, Sequence[str]] | None = None) -> tuple[str, str]:
    """``(instruction, answer)`` of one example: a template drawn from its task's set (see the module
    docstring for the answers)."""
    templates = templates or load_templates()
    task = payload["task"]
    if task == "conversation":
        turns = payload["turns"]
        human, gpt = turns[int(rng.integers(len(turns)))]
        return fill(templates[task][int(rng.integers(len(templates[task])))], question=human), gpt
    template = templates[task][int(rng.integers(len(templates[task])))]
    if task == "captioning":
        captions = payload["captions"]
        return fill(template), captions[int(rng.integers(len(captions)))]
    if task == "vqa":
        return fill(template, question=payload["question"]), payload["answer"]
    if task == "multiple_choice":
        return fill(template, question=payload["question"], options=payload["choices"]), payload["answer"]
    raise ValueError(f"unknown task type {task!r}; expected one of {TASK_TYPES}")

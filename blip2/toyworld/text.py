"""Text of the toy world: captions, web junk, instruction tasks and the LM pretraining text.

Everything here is a pure function of attributes and a numpy ``Generator``, so the corpus, the
tokenizers and the backbones all see the same language.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from blip2.toyworld.world import ATTRIBUTES, COLOURS, POSITIONS, SHAPES, SIZES, Attributes

WHERE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "{where} there is a {size} {colour} {shape}",
    "a picture of a {size} {colour} {shape} {where}",
    "a {size} {shape} in {colour} {where}",
    "one {colour} {shape} of {size} size {where}",
)

# What web alt-texts look like when they say nothing about the image.
JUNK_TEXTS: tuple[str, ...] = (
    "IMG_{n:04d}.JPG", "DSC{n:05d}.jpg", "click to enlarge", "image", "untitled", "stock photo {n}",
    "thumbnail", "photo by user{n}", "", "download now", "screenshot {n}", "view full size",
)


def caption(attributes: Attributes, template: int = 0) -> str:
    """The caption of ``attributes`` in template number ``template``."""
    return CAPTION_TEMPLATES[template].format(where=WHERE[attributes.position], **attributes.as_dict())


def random_caption(attributes: Attributes, rng: np.random.Generator) -> str:
    return caption(attributes, int(rng.integers(len(CAPTION_TEMPLATES))))


def junk_text(rng: np.random.Generator) -> str:
    return JUNK_TEXTS[int(rng.integers(len(JUNK_TEXTS)))].format(n=int(rng.integers(10000)))


_WORD_TO_ATTRIBUTE = {value: name for name, values in ATTRIBUTES.items() for value in values}
_WORD_TO_ATTRIBUTE.update({"center": "position", "middle": "position"})
_NORMALISE = {"center": "centre", "middle": "centre"}


def parse_attributes(text: str) -> dict[str, str]:
    """The attributes a text states, by keyword: ``{"colour": "red", ...}``.

    An attribute stated twice with different values is ambiguous and left out, so a caption that
    hedges ("a red or blue circle") never scores as right.
    """
    found: dict[str, set[str]] = {}
    for word in text.lower().replace(",", " ").replace(".", " ").replace("?", " ").split():
        if word in _WORD_TO_ATTRIBUTE:
            found.setdefault(_WORD_TO_ATTRIBUTE[word], set()).add(_NORMALISE.get(word, word))
    return {name: values.pop() for name, values in found.items() if len(values) == 1}


def caption_matches(text: str, attributes: Attributes) -> bool:
    """True when ``text`` states all four attributes of the image, each correctly."""
    return parse_attributes(text) == attributes.as_dict()


# ---------------------------------------------------------------------------------------------------
# Instruction tasks (InstructBLIP): families with several phrasings; answers are exact strings.


@dataclass(frozen=True)
class InstructionExample:
    task: str
    instruction: str
    answer: str


INSTRUCTION_TASKS: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is the shape?", "what is the colour of the object?",
               "which colour does the shape have?", "tell me the colour of the shape."),
    "shape": ("what shape is this?", "what kind of shape is in the image?", "name the shape.",
              "which shape can you see?"),
    "size": ("is the shape small or large?", "how big is the shape?", "what size is the object?"),
    "position": ("where is the shape?", "in which part of the image is the shape?",
                 "where is the object located?"),
    "describe": ("describe the image.", "what do you see?", "write a short caption for this image.",
                 "describe the picture briefly."),
    "verify": ("is the shape {colour}?", "is the object {colour}?", "is the shape a {shape}?",
               "is the object a {shape}?", "is the shape {size}?", "is the object {size}?",
               "is the shape {where}?", "is the object {where}?"),
    "existence": ("is there a {colour} {shape}?", "does the image contain a {colour} {shape}?",
                  "can you see a {colour} {shape}?"),
}
# Held out of instruction tuning by default, for zero-shot evaluation (as InstructBLIP holds out
# whole task families, not just examples).
HELD_OUT_TASKS: tuple[str, ...] = ("existence",)
# The families answered yes or no (chance is 0.5; the VQA/GQA copies call them "verify" questions).
YES_NO_TASKS: tuple[str, ...] = ("verify", "existence")


def instruction_example(task: str, attributes: Attributes, rng: np.random.Generator) -> InstructionExample:
    """One (instruction, answer) pair of family ``task`` about an image with ``attributes``."""
    phrasings = INSTRUCTION_TASKS[task]
    phrasing = phrasings[int(rng.integers(len(phrasings)))]
    if task in ("colour", "shape", "size", "position"):
        return InstructionExample(task, phrasing, getattr(attributes, task))
    if task == "describe":
        return InstructionExample(task, phrasing, caption(attributes, 0))
    if task == "verify":
        # One attribute, stated truly half the time.
        name = next(n for n in ("colour", "shape", "size", "where") if "{" + n + "}" in phrasing)
        attribute = "position" if name == "where" else name
        value = getattr(attributes, attribute)
        asked = value if rng.random() < 0.5 else _other(tuple(ATTRIBUTES[attribute]), value, rng)
        stated = WHERE[asked] if name == "where" else asked
        return InstructionExample(task, phrasing.format(**{name: stated}), "yes" if asked == value else "no")
    if task == "existence":
        # Half the questions ask about what is there; the rest change the colour, the shape or both.
        colour, shape = attributes.colour, attributes.shape
        if rng.random() < 0.5:
            change = ("colour", "shape", "both")[int(rng.integers(3))]
            if change in ("colour", "both"):
                colour = _other(tuple(COLOURS), colour, rng)
            if change in ("shape", "both"):
                shape = _other(SHAPES, shape, rng)
        answer = "yes" if (colour, shape) == (attributes.colour, attributes.shape) else "no"
        return InstructionExample(task, phrasing.format(colour=colour, shape=shape), answer)
    raise ValueError(f"unknown instruction task {task!r}; expected one of {tuple(INSTRUCTION_TASKS)}")


def _other(values: tuple[str, ...], value: str, rng: np.random.Generator) -> str:
    choices = [v for v in values if v != value]
    return choices[int(rng.integers(len(choices)))]


# ---------------------------------------------------------------------------------------------------
# Language-model pretraining text. The LMs never see images; they learn the toy language and, crucially,
# to *use their context*: an unordered bag of attribute words comes first and the caption or answer that
# follows must agree with it. In stage 2 the projected Q-Former queries take the place of that bag.


@dataclass(frozen=True)
class TextExample:
    """One LM pretraining example, laid out as stage 2 lays out its inputs.

    ``context`` is the bag of attribute words (or ``""``): it sits where the Q-Former queries will sit,
    before ``<s>``. ``prompt`` is text after ``<s>`` that the LM reads but is not trained to produce
    (the instruction, as InstructBLIP puts it after the queries; ``""`` for captions). ``target`` is what
    the LM is trained to produce: the caption or the answer.
    """

    context: str
    target: str
    prompt: str = ""


def context_words(attributes: Attributes, rng: np.random.Generator) -> str:
    """The four attribute words, each repeated 1-3 times, shuffled: a stand-in for visual tokens."""
    words = [w for w in attributes.as_dict().values() for _ in range(int(rng.integers(1, 4)))]
    rng.shuffle(words)
    return " ".join(words)


# How often each instruction task is drawn for LM pretraining, relative to the others. Every task but
# ``existence`` and ``verify`` only copies a word (or the caption) from the context and is learned in a few
# hundred steps; those two must compare the question's words with the context, and at equal weight a tiny
# LM sat on the majority answer for over a thousand steps.
LM_TASK_WEIGHTS: dict[str, float] = {task: 5.0 if task in YES_NO_TASKS else 1.0 for task in INSTRUCTION_TASKS}


def lm_pretraining_example(attributes: Attributes, rng: np.random.Generator,
                           task_weights: Mapping[str, float] = LM_TASK_WEIGHTS) -> TextExample:
    """One LM pretraining example: a caption (10%), a caption conditioned on context words (30%), or an
    answer conditioned on context words and an instruction (60%, tasks drawn by ``task_weights``)."""
    kind = rng.random()
    if kind < 0.1:
        return TextExample("", random_caption(attributes, rng))
    if kind < 0.4:
        return TextExample(context_words(attributes, rng), random_caption(attributes, rng))
    weights = np.array(list(task_weights.values()))
    task = tuple(task_weights)[int(rng.choice(len(weights), p=weights / weights.sum()))]
    example = instruction_example(task, attributes, rng)
    return TextExample(context_words(attributes, rng), example.answer, prompt=example.instruction)


def vocabulary_text() -> list[str]:
    """Every word the toy world can produce, for building tokenizers."""
    texts = [caption(Attributes(s, c, z, p), t) for s in SHAPES for c in COLOURS for z in SIZES
             for p in POSITIONS for t in range(len(CAPTION_TEMPLATES))]
    texts += [p for phrasings in INSTRUCTION_TASKS.values() for p in phrasings]
    texts += [j.format(n=n) for j in JUNK_TEXTS for n in (0, 1234, 56789)]
    texts += ["yes", "no", "center", "middle"]
    return texts

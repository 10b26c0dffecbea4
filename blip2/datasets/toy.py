"""Toy-world-only metrics, reported beside the standard ones when a set is the toy world's copy of a
held-out split (``blip2 toyworld`` writes them under ``<out>/standard/``, :mod:`blip2.toyworld.standard`).

The toy world knows each image's four attributes (shape, colour, size, position), so it can score what a
real set cannot: whether a retrieved image *fits* the text (attribute-level recall: in the toy world
several images fit one caption), whether a caption states the right attributes, accuracy per instruction
family with the families held out of instruction tuning apart, and image-text matching against captions
with one attribute changed. The ground truth is read back from the set itself: every reference caption
of a toy image states all four attributes (:func:`set_attributes`), so nothing beside the standard files
is needed. Everything here is pure: the rankings, predictions and match logits come from the same
evaluation run (``blip2 evaluate``) that the standard metrics come from.

Names are those the training reports have always used (``t2i_r1_attribute``, ``caption_accuracy``,
``accuracy/held_out``, ``itm_pairwise_random``, ...); ``*_strict`` recall is the standard recall
(a text's own image; an image's own captions) under its toy-report name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from blip2.datasets.captions import CaptionedImage
from blip2.datasets.errors import DatasetError
from blip2.datasets.questions import VisualQuestion
from blip2.matching import MatchingPairs, matching_pairs, score_matching
from blip2.metrics import (
    attribute_relevance,
    caption_attribute_accuracy,
    identity_relevance,
    mean_by_task,
    recall_at_k,
    rerank_effect,
)
from blip2.toyworld.text import HELD_OUT_TASKS, caption, parse_attributes
from blip2.toyworld.world import ATTRIBUTES, Attributes

NUM_EXAMPLES = 5  # generated/true pairs kept in a report, for people to read


def set_attributes(images: Sequence[CaptionedImage]) -> list[Attributes]:
    """Each image's attributes, read from its reference captions (all of which state the same four);
    a :class:`DatasetError` when a set is not a toy-world set."""
    result = []
    for image in images:
        stated = [parse_attributes(text) for text in image.captions]
        if not stated or any(len(s) != len(ATTRIBUTES) or s != stated[0] for s in stated):
            raise DatasetError(f"image {image.image_id}: its references do not all state the same four attributes "
                               f"({image.captions[:2]}...): toy-only metrics need a toy-world set (blip2 toyworld's "
                               f"standard/ copy)")
        result.append(Attributes(**stated[0]))
    return result


def toy_relevance(texts: Sequence[str], text_image: Sequence[int], attributes: Sequence[Attributes]
                  ) -> dict[tuple[str, str], torch.Tensor]:
    """Relevance per (direction, level), built once per evaluation and shared by
    :func:`retrieval_metrics` and :func:`rerank_metrics`: t2i (T, I) and i2t (I, T), strict (a text's own
    image; an image's own captions) and attribute-level (an image with every attribute the text states;
    for an image, a caption stating exactly its four attributes)."""
    strict = identity_relevance(list(text_image), list(range(len(attributes))))  # (T, I)
    stated = [parse_attributes(text) for text in texts]
    fits = attribute_relevance(stated, [a.as_dict() for a in attributes])  # (T, I)
    complete = torch.tensor([len(s) == len(ATTRIBUTES) for s in stated])  # (T,)
    return {("t2i", "strict"): strict, ("t2i", "attribute"): fits,
            ("i2t", "strict"): strict.t(), ("i2t", "attribute"): (fits & complete[:, None]).t()}


def retrieval_metrics(text_to_image: torch.Tensor, image_to_text: torch.Tensor,
                      relevance: dict[tuple[str, str], torch.Tensor], ks: Sequence[int] = (1, 5, 10),
                      suffix: str = "") -> dict[str, float]:
    """``{t2i,i2t}_r{k}_{strict,attribute}`` + ``suffix`` of rankings ``text_to_image`` (T, >= k) and
    ``image_to_text`` (I, >= k), best first, against :func:`toy_relevance`."""
    metrics = {}
    for (direction, level), relevant in relevance.items():
        ranking = text_to_image if direction == "t2i" else image_to_text
        for name, value in recall_at_k(ranking, relevant, ks).items():
            metrics[f"{direction}_r{name.split('@')[1]}_{level}{suffix}"] = value
    return dict(sorted(metrics.items()))


def rerank_metrics(reranked: tuple[torch.Tensor, torch.Tensor], itc: tuple[torch.Tensor, torch.Tensor],
                   relevance: dict[tuple[str, str], torch.Tensor]) -> dict[str, int]:
    """How the ITM re-rank moved R@1 against ITC alone, attribute-level and strict: per direction, the
    queries whose top 1 it made right (``{t2i,i2t}_rerank_fixed_{attribute,strict}``) and wrong
    (``..._broken_...``). ``reranked`` and ``itc`` are (text_to_image, image_to_text) rankings;
    ``relevance`` is :func:`toy_relevance`'s."""
    metrics = {}
    for (direction, level), relevant in relevance.items():
        index = 0 if direction == "t2i" else 1
        effect = rerank_effect(reranked[index], itc[index], relevant)
        metrics[f"{direction}_rerank_fixed_{level}"] = effect["fixed"]
        metrics[f"{direction}_rerank_broken_{level}"] = effect["broken"]
    return metrics


def matching_texts(attributes: Sequence[Attributes], seed: int = 0) -> MatchingPairs:
    """Per image a right caption, a one-attribute-wrong one and a random wrong one (fixed seed)."""
    return matching_pairs(attributes, seed)


def matching_metrics(right_logits: Sequence[float], wrong_logits: dict[str, Sequence[float]]) -> dict[str, float | int]:
    """:func:`blip2.matching.score_matching` of ITM match-minus-no-match logits (P(match) is their
    sigmoid: the softmax of the two logits), plus ``itm_num_images``."""
    p_right = torch.sigmoid(torch.tensor(right_logits, dtype=torch.float64))
    p_wrong = {kind: torch.sigmoid(torch.tensor(values, dtype=torch.float64)) for kind, values in wrong_logits.items()}
    return {**score_matching(p_right, p_wrong), "itm_num_images": len(right_logits)}


def caption_metrics(predictions: Sequence[str], attributes: Sequence[Attributes],
                    num_examples: int = NUM_EXAMPLES) -> dict[str, Any]:
    """``caption_accuracy`` (all four attributes stated correctly), ``attribute_accuracy/<name>``, and
    ``examples``: the first ``num_examples`` ``{"caption": generated, "truth": template-0 caption}``."""
    accuracy = caption_attribute_accuracy(list(predictions), list(attributes))
    metrics: dict[str, Any] = {"caption_accuracy": accuracy["all"]}
    metrics.update({f"attribute_accuracy/{name}": accuracy[name] for name in ATTRIBUTES})
    metrics["examples"] = [{"caption": text, "truth": caption(a)}
                           for text, a in zip(predictions[:num_examples], attributes[:num_examples])]
    return metrics


def question_metrics(predictions: Sequence[str], questions: Sequence[VisualQuestion], scores: Sequence[float],
                     held_out: Sequence[str] = HELD_OUT_TASKS, examples_per_family: int = 1) -> dict[str, Any]:
    """Accuracy per instruction family (a toy question's ``question_type`` is its family):
    ``accuracy/<family>``, ``accuracy/all``, ``accuracy/held_in`` and ``accuracy/held_out`` (the families
    in ``held_out``, never tuned on: zero-shot); an aggregate with no questions is left out.
    ``num_examples`` and ``examples`` (the first ``examples_per_family`` of each family). ``scores``
    are the standard per-question accuracies (the toy answers are given by all ten annotators, so these
    are exact match)."""
    values = np.asarray(scores, dtype=float)
    by_family = mean_by_task(values, [q.question_type for q in questions], held_out)
    metrics: dict[str, Any] = {f"accuracy/{key}": value for key, value in by_family.items()}
    metrics["num_examples"] = len(questions)
    shown: dict[str, int] = {}
    examples = []
    for text, question, score in zip(predictions, questions, values):
        if shown.get(question.question_type, 0) < examples_per_family:
            shown[question.question_type] = shown.get(question.question_type, 0) + 1
            examples.append({"task": question.question_type, "instruction": question.question,
                             "answer": question.answers[0], "generated": text, "correct": bool(score == 1.0)})
    metrics["examples"] = examples
    return metrics

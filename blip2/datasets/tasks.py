"""The evaluation tasks over the standard sets: what each reads and how its predictions are scored.

========================  ==========  ==========================================================
task                      kind        files (``annotations`` / ``questions``, ``images``)
========================  ==========  ==========================================================
``coco_retrieval``        retrieval   Karpathy ``coco_karpathy_test.json`` + COCO image root
``coco_captions``         captioning  Karpathy JSON or COCO ``captions_*.json`` + images
``nocaps``                captioning  ``nocaps_val_4500_captions.json`` (COCO format) + images
``vqav2`` / ``okvqa``     vqa         questions JSON + annotations JSON + COCO images
``gqa``                   gqa         ``testdev_balanced_questions.json`` + GQA images
========================  ==========  ==========================================================

Scores: retrieval recall@1/5/10 in both directions (a text's only relevant image is its own; an image's
relevant texts are all its captions), captioning BLEU-4 and CIDEr-D (:mod:`blip2.metrics`, equal to
pycocoevalcap's; per NoCaps domain when the images have one), VQA accuracy as the official script
computes it (also per answer type and per question type) and GQA exact match (per structural type)
(:mod:`blip2.vqa_accuracy`). The functions are pure: predictions in, numbers out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from blip2.datasets.captions import CaptionedImage, load_coco_captions, load_karpathy
from blip2.datasets.errors import DatasetError, read_json
from blip2.datasets.questions import VisualQuestion, load_gqa, load_vqa
from blip2.datasets.task_kinds import task_kind
from blip2.metrics import bleu4, cider_d_scores, identity_relevance, recall_at_k
from blip2.vqa_accuracy import gqa_accuracy, vqa_accuracy

RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10)


def load_task(task: str, annotations: str | Path = "", images: str | Path = "", questions: str | Path = ""
              ) -> list[CaptionedImage] | list[VisualQuestion]:
    """The items of ``task``: captioned images (retrieval, captioning) or questions (vqa, gqa).

    Captioning reads either layout (a JSON list is Karpathy's, an object COCO's)."""
    kind = task_kind(task)
    if not images:
        raise DatasetError(f"{task}: set images= to the directory holding the set's images")
    if kind in ("retrieval", "captioning"):
        if not annotations:
            raise DatasetError(f"{task}: set annotations= to the captions JSON (Karpathy or COCO format)")
        if kind == "retrieval" or isinstance(read_json(annotations, "a captions JSON"), list):
            return load_karpathy(annotations, images)
        return load_coco_captions(annotations, images)
    if not questions:
        raise DatasetError(f"{task}: set questions= to the questions JSON")
    if kind == "gqa":
        return load_gqa(questions, images)
    return load_vqa(questions, annotations or None, images)


def score_captioning(predictions: Sequence[str], images: Sequence[CaptionedImage]) -> dict[str, float | int]:
    """``bleu4``, ``cider_d`` (and ``cider_d/<domain>`` for NoCaps-style domains), ``num_images``."""
    references = [list(image.captions) for image in images]
    cider = cider_d_scores(predictions, references)  # document frequencies from the whole set, as COCO's
    metrics: dict[str, float | int] = {"bleu4": bleu4(predictions, references), "cider_d": float(cider.mean())}
    domains = np.array([image.domain for image in images], dtype=object)
    for domain in sorted({d for d in domains if d}):
        metrics[f"cider_d/{domain}"] = float(cider[domains == domain].mean())
    metrics["num_images"] = len(images)
    return metrics


def question_scores(task: str, predictions: Sequence[str], questions: Sequence[VisualQuestion]) -> list[float]:
    """Each prediction's accuracy: official VQA accuracy, or GQA exact match."""
    if len(predictions) != len(questions) or not questions:
        raise ValueError(f"need one prediction per question, got {len(predictions)} and {len(questions)}")
    unanswered = [q.question_id for q in questions if not q.answers]
    if unanswered:
        raise DatasetError(f"{task}: {len(unanswered)} questions have no answers (e.g. {unanswered[0]}); "
                           f"scoring needs the annotations (test-dev answers are only on the evaluation server)")
    if task_kind(task) == "gqa":
        return [gqa_accuracy(p, q.answers[0]) for p, q in zip(predictions, questions)]
    return [vqa_accuracy(p, q.answers) for p, q in zip(predictions, questions)]


def score_questions(task: str, predictions: Sequence[str], questions: Sequence[VisualQuestion]) -> dict[str, float | int]:
    """``accuracy`` and its breakdowns ``accuracy/answer_type/<t>``, ``accuracy/question_type/<t>``
    (the toy world's question types are its families), ``num_questions``."""
    scores = np.array(question_scores(task, predictions, questions))
    metrics: dict[str, float | int] = {"accuracy": float(scores.mean())}
    for field in ("answer_type", "question_type"):
        values = np.array([getattr(q, field) for q in questions], dtype=object)
        for value in sorted({v for v in values if v}):
            metrics[f"accuracy/{field}/{value}"] = float(scores[values == value].mean())
    metrics["num_questions"] = len(questions)
    return metrics


def retrieval_relevance(text_image: Sequence[int], num_images: int) -> torch.Tensor:
    """(T, I) bool: text t is relevant to image ``text_image[t]`` only."""
    return identity_relevance(list(text_image), list(range(num_images)))


def score_retrieval(text_to_image: torch.Tensor, image_to_text: torch.Tensor, text_image: Sequence[int],
                    num_images: int, ks: Sequence[int] = RETRIEVAL_KS, suffix: str = "") -> dict[str, float]:
    """Recall@k of rankings: ``text_to_image`` (T, >= k) image indices per text, ``image_to_text``
    (I, >= k) text indices per image, best first. Keys ``t2i_r{k}`` and ``i2t_r{k}`` (+ ``suffix``)
    and their mean ``r_mean`` (the number retrieval tables sort by)."""
    relevant = retrieval_relevance(text_image, num_images)  # (T, I)
    metrics = {}
    for direction, ranking, matrix in (("t2i", text_to_image, relevant), ("i2t", image_to_text, relevant.t())):
        for name, value in recall_at_k(ranking, matrix, ks).items():
            metrics[f"{direction}_r{name.split('@')[1]}{suffix}"] = value
    metrics[f"r_mean{suffix}"] = float(np.mean(list(metrics.values())))
    return metrics


def _itc_order(scores: torch.Tensor) -> torch.Tensor:
    """Columns best first; stable, so ties (an unreadable image's zero features) order the same in
    :func:`itm_candidates` and :func:`rerank`."""
    return torch.argsort(scores, dim=1, descending=True, stable=True)


def itm_candidates(similarity: torch.Tensor, k: int) -> list[list[int]]:
    """For each image, the texts ITM must score to re-rank both directions' top ``k`` by ITC:
    its own top-k texts and every text whose top-k images include it. ``similarity`` (I, T)."""
    candidates = [set(row) for row in _itc_order(similarity)[:, :k].tolist()]
    for text, images in enumerate(_itc_order(similarity.t())[:, :k].tolist()):
        for image in images:
            candidates[image].add(text)
    return [sorted(c) for c in candidates]


def rerank(similarity: torch.Tensor, itm_logit: dict[tuple[int, int], float], k: int, itc_scale: float = 1.0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_to_image (T, I), image_to_text (I, T)) rankings: each query's ITC top ``k`` re-ordered by
    ITM logit + ``itc_scale`` * ITC similarity, the rest in ITC order. ``itc_scale=1`` is BLIP-2's sum;
    0 ranks the top ``k`` by ITM alone (as :func:`blip2.models.scoring.rerank_with_itm`).
    ``itm_logit[(image, text)]`` must hold every pair :func:`itm_candidates` named."""
    if itc_scale < 0:
        raise ValueError(f"itc_scale must be >= 0, got {itc_scale}")
    def one_direction(scores: torch.Tensor, pair: callable) -> torch.Tensor:
        order = _itc_order(scores)
        depth = min(k, scores.shape[1])
        for row in range(scores.shape[0]):
            top = order[row, :depth].tolist()
            rescored = [itm_logit[pair(row, column)] + itc_scale * float(scores[row, column]) for column in top]
            best_first = sorted(range(depth), key=lambda i: -rescored[i])  # stable: ties keep ITC order
            order[row, :depth] = torch.tensor([top[i] for i in best_first])
        return order

    image_to_text = one_direction(similarity, lambda image, text: (image, text))
    text_to_image = one_direction(similarity.t(), lambda text, image: (image, text))
    return text_to_image, image_to_text

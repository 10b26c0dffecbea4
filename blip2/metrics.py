"""Evaluation metrics reported by the training, instruction-tuning and CapFilt jobs.

Four groups, each a pure function of predictions and ground truth (no model, no Ray):

- **Retrieval** (ITC/ITM): :func:`recall_at_k` over a ranking and a relevance matrix. Relevance is
  either strict (:func:`identity_relevance`: the paired image only) or attribute-level
  (:func:`attribute_relevance`: every image that has all the attributes the caption states; in the toy
  world several images fit one caption, and strict recall would call those retrievals wrong).
- **Captioning** (ITG): :func:`caption_attribute_accuracy` (does the caption say the right things),
  :func:`bleu4` and :func:`cider_d` (does it say them the way the references do; equal to pycocoevalcap's
  ``Bleu(4)`` and ``Cider`` scorers on the same tokens, which a test checks).
- **Instructions** (InstructBLIP): :func:`exact_match` and :func:`accuracy_by_task` with held-in and
  held-out aggregates.
- **Filtering** (CapFilt): :func:`filter_precision_recall` of the alt-texts the filter flags as wrong.

Visual question answering on the standard sets (official VQA accuracy, GQA exact match) lives in
:mod:`blip2.vqa_accuracy`.

Every function raises ``ValueError`` on empty or mismatched inputs rather than returning ``nan``: an
empty evaluation set is a bug upstream, and a ``nan`` in a report hides it.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from blip2.toyworld.text import HELD_OUT_TASKS, caption_matches, parse_attributes
from blip2.toyworld.world import ATTRIBUTES, Attributes

MAX_NGRAM = 4  # BLEU-4 and CIDEr-D both use n-grams of order 1..4
CIDER_SIGMA = 6.0  # the Gaussian length penalty's width in CIDEr-D (Vedantam et al. 2015)


def _check_paired(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    if len(a) == 0:
        raise ValueError(f"{name_a} is empty; a metric over no examples is undefined")
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} differ in length: {len(a)} != {len(b)}")


# ---------------------------------------------------------------------------------------------------
# Retrieval


def recall_at_k(ranking: Tensor, relevant: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k: the fraction of rows (queries) with at least one relevant column in their top k.

    Args:
        ranking: (R, K) integer column indices per query, best first, e.g.
            ``scores.argsort(dim=1, descending=True)``. ``K`` may be less than ``C`` (a top-K list) as
            long as it covers ``min(k, C)`` for every ``k``.
        relevant: (R, C) bool, ``relevant[r, c]`` when column ``c`` is a right answer to query ``r``.
        ks: the cut-offs; a ``k`` above ``C`` is clipped to ``C``.

    Returns:
        ``{"recall@1": ..., "recall@5": ..., ...}``, each in [0, 1]. A query with no relevant column
        counts as a miss (it can never be a hit), so such rows lower recall instead of vanishing.
    """
    if ranking.ndim != 2 or relevant.ndim != 2:
        raise ValueError(f"ranking and relevant must be 2-D, got {tuple(ranking.shape)} and {tuple(relevant.shape)}")
    num_rows, num_columns = relevant.shape
    if num_rows == 0 or num_columns == 0:
        raise ValueError(f"relevant has shape {tuple(relevant.shape)}; recall over no queries is undefined")
    if ranking.shape[0] != num_rows:
        raise ValueError(f"ranking has {ranking.shape[0]} rows but relevant has {num_rows}")
    if ranking.dtype.is_floating_point or ranking.dtype == torch.bool:
        raise ValueError(f"ranking must hold integer column indices, got dtype {ranking.dtype}")
    if relevant.dtype != torch.bool:
        raise ValueError(f"relevant must be a bool tensor, got dtype {relevant.dtype}")
    if ranking.numel() and (int(ranking.min()) < 0 or int(ranking.max()) >= num_columns):
        raise ValueError(f"ranking holds indices outside [0, {num_columns})")
    if not ks:
        raise ValueError("ks is empty")
    recalls = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        depth = min(k, num_columns)
        if ranking.shape[1] < depth:
            raise ValueError(f"recall@{k} needs the top {depth} columns but ranking has only {ranking.shape[1]}")
        hits = relevant.gather(1, ranking[:, :depth].long()).any(dim=1)  # (R,)
        recalls[f"recall@{k}"] = hits.float().mean().item()
    return recalls


def rerank_effect(reranked: Tensor, baseline: Tensor, relevant: Tensor) -> dict[str, float | int]:
    """What a re-rank did to each query's top 1 against the ranking it re-ordered.

    ``reranked`` and ``baseline``: (R, >= 1) column indices per query, best first; ``relevant`` (R, C) bool.
    Returns ``changed`` (the share of queries whose top 1 differs), ``fixed`` (queries whose top 1 is
    relevant after the re-rank and was not before) and ``broken`` (the reverse). R@1 moves by
    ``(fixed - broken) / R``; a re-rank that only echoes the baseline changes nothing."""
    if reranked.shape[0] != baseline.shape[0] or reranked.shape[0] != relevant.shape[0] or not relevant.shape[0]:
        raise ValueError(f"reranked, baseline and relevant must have the same (non-zero) number of rows, got "
                         f"{reranked.shape[0]}, {baseline.shape[0]} and {relevant.shape[0]}")
    after = relevant.gather(1, reranked[:, :1].long()).squeeze(1)  # (R,)
    before = relevant.gather(1, baseline[:, :1].long()).squeeze(1)
    return {"changed": (reranked[:, 0] != baseline[:, 0]).float().mean().item(),
            "fixed": int((after & ~before).sum()), "broken": int((before & ~after).sum())}


def identity_relevance(row_ids: Sequence[Hashable], column_ids: Sequence[Hashable]) -> Tensor:
    """Strict relevance: ``(R, C)`` bool, true where a row and a column come from the same image.

    With one caption per image and both sides in the same order this is the identity matrix; with
    several captions per image pass each caption's image id as its row (or column) id.
    """
    if len(row_ids) == 0 or len(column_ids) == 0:
        raise ValueError("row_ids and column_ids must both be non-empty")
    codes = {key: code for code, key in enumerate(dict.fromkeys([*row_ids, *column_ids]))}
    rows = torch.tensor([codes[key] for key in row_ids])
    columns = torch.tensor([codes[key] for key in column_ids])
    return rows[:, None] == columns[None, :]  # (R, C)


def attribute_relevance(
    caption_attributes: Sequence[Mapping[str, str]], image_attributes: Sequence[Mapping[str, str]]
) -> Tensor:
    """Attribute-level relevance: ``(T, I)`` bool, true where image ``i`` has every attribute that
    caption ``t`` states, with the same value.

    Captions may be partial (``{"colour": "red"}`` fits every red image). A caption that states
    nothing (``{}``, e.g. web junk) fits every image, as the definition says; drop such captions before
    evaluating if a free hit is not wanted. An attribute the caption states but the image lacks never
    fits. Inputs are ``parse_attributes(text)`` and ``Attributes.as_dict()`` respectively.
    """
    if len(caption_attributes) == 0 or len(image_attributes) == 0:
        raise ValueError("caption_attributes and image_attributes must both be non-empty")
    # Encode each attribute as one integer column so the (T, I) comparison is a few tensor ops rather
    # than T * I dict comparisons: values get codes >= 0, "image lacks it" is -1, "caption is silent" -2.
    names = sorted({name for attributes in [*caption_attributes, *image_attributes] for name in attributes})
    relevant = torch.ones(len(caption_attributes), len(image_attributes), dtype=torch.bool)
    for name in names:
        values: dict[str, int] = {}
        image_codes = torch.tensor([values.setdefault(a[name], len(values)) if name in a else -1
                                    for a in image_attributes])  # (I,)
        caption_codes = torch.tensor([values.setdefault(a[name], len(values)) if name in a else -2
                                      for a in caption_attributes])  # (T,)
        silent = (caption_codes == -2)[:, None]  # (T, 1)
        relevant &= silent | (caption_codes[:, None] == image_codes[None, :])
    return relevant


# ---------------------------------------------------------------------------------------------------
# Captioning


def caption_attribute_accuracy(captions: Sequence[str], attributes: Sequence[Attributes]) -> dict[str, float]:
    """How often generated captions state the image's attributes correctly.

    Returns ``{"all": ..., "shape": ..., "colour": ..., "size": ..., "position": ...}``: ``all`` is the
    fraction of captions that state all four attributes, each correctly (``caption_matches``); each
    per-attribute entry is the fraction whose caption states that attribute unambiguously and
    correctly (an unstated or hedged attribute counts as wrong).
    """
    _check_paired("captions", captions, "attributes", attributes)
    stated = [parse_attributes(text) for text in captions]
    accuracy = {"all": float(np.mean([caption_matches(text, a) for text, a in zip(captions, attributes)]))}
    for name in ATTRIBUTES:
        accuracy[name] = float(np.mean([s.get(name) == getattr(a, name) for s, a in zip(stated, attributes)]))
    return accuracy


_PUNCTUATION_TO_SPACE = str.maketrans({character: " " for character in string.punctuation})


def caption_tokens(text: str) -> list[str]:
    """Lowercase, turn ASCII punctuation into spaces, split on whitespace.

    Punctuation becomes a space rather than vanishing so that "red,blue" is two words, as a PTB
    tokenizer followed by dropping punctuation tokens would make it.
    """
    return text.lower().translate(_PUNCTUATION_TO_SPACE).split()


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check_references(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    _check_paired("candidates", candidates, "references", references)
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(f"references[{i}] is a string; pass a list of reference strings per candidate")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty; every candidate needs at least one reference")


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus-level BLEU-4 (Papineni et al. 2002), in [0, 1].

    Definition implemented, with ``c_i`` the candidate tokens and ``R_i`` its references (tokenised by
    :func:`caption_tokens`):

    - clipped n-gram precision, summed over the corpus before dividing:
      ``p_n = sum_i sum_g min(count(g, c_i), max_{r in R_i} count(g, r)) / sum_i max(|c_i| - n + 1, 0)``
      for ``n = 1..4``;
    - brevity penalty from corpus lengths ``c = sum_i |c_i|`` and ``r = sum_i |r_i*|``, where ``r_i*`` is
      the reference closest in length to ``c_i`` (ties go to the shorter one):
      ``BP = 1 if c > r else exp(1 - r / c)``;
    - ``BLEU = BP * exp(mean_n log p_n)``.

    No smoothing: if any ``p_n`` is 0 (e.g. every candidate is shorter than four tokens) BLEU-4 is 0,
    as in the original definition. An all-empty candidate set scores 0.
    """
    _check_references(candidates, references)
    matched = [0] * MAX_NGRAM
    possible = [0] * MAX_NGRAM
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references):
        tokens = caption_tokens(candidate)
        ref_tokens = [caption_tokens(r) for r in refs]
        candidate_length += len(tokens)
        reference_length += min((len(r) for r in ref_tokens), key=lambda length: (abs(length - len(tokens)), length))
        for n in range(1, MAX_NGRAM + 1):
            counts = _ngram_counts(tokens, n)
            # Clipping: a candidate n-gram is credited at most as often as it appears in any one reference.
            max_ref_counts: Counter[tuple[str, ...]] = Counter()
            for r in ref_tokens:
                max_ref_counts |= _ngram_counts(r, n)
            matched[n - 1] += sum(min(count, max_ref_counts[g]) for g, count in counts.items())
            possible[n - 1] += max(len(tokens) - n + 1, 0)
    if candidate_length == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matched, possible)) / MAX_NGRAM
    brevity_penalty = 1.0 if candidate_length > reference_length else math.exp(1 - reference_length / candidate_length)
    return brevity_penalty * math.exp(log_precision)


def cider_d_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = CIDER_SIGMA
) -> np.ndarray:
    """CIDEr-D of each candidate, shape (N,). See :func:`cider_d` for the definition."""
    _check_references(candidates, references)
    num_images = len(references)
    ref_tokens = [[caption_tokens(r) for r in refs] for refs in references]
    ref_counts = [[[_ngram_counts(t, n) for n in range(1, MAX_NGRAM + 1)] for t in refs] for refs in ref_tokens]
    # Document frequency: in how many images' reference sets an n-gram occurs (n-grams of different
    # orders are tuples of different lengths, so one Counter holds all orders without collisions).
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        document_frequency.update({g for counts in refs for by_order in counts for g in by_order})

    def tfidf(counts: Counter[tuple[str, ...]]) -> dict[tuple[str, ...], float]:
        # df is floored at 1 so n-grams no reference contains (only candidates have them) get the
        # largest idf, log(N), instead of a division by zero; they lengthen the candidate's vector.
        return {g: c * (math.log(num_images) - math.log(max(document_frequency[g], 1))) for g, c in counts.items()}

    ref_vectors = [[[tfidf(by_order) for by_order in counts] for counts in refs] for refs in ref_counts]
    scores = np.zeros(len(candidates))
    for i, candidate in enumerate(candidates):
        tokens = caption_tokens(candidate)
        cand_vectors = [tfidf(_ngram_counts(tokens, n)) for n in range(1, MAX_NGRAM + 1)]
        total = 0.0
        for ref_vector_by_order, ref in zip(ref_vectors[i], ref_tokens[i]):
            similarity = 0.0
            for cand_vector, ref_vector in zip(cand_vectors, ref_vector_by_order):
                # min() clips the candidate's weight by the reference's, i.e. its count by the
                # reference count (idf >= 0 is shared), so repeating a right word earns nothing extra.
                dot = sum(min(w, ref_vector.get(g, 0.0)) * ref_vector.get(g, 0.0) for g, w in cand_vector.items())
                norms = math.sqrt(sum(w * w for w in cand_vector.values())) * math.sqrt(
                    sum(w * w for w in ref_vector.values()))
                similarity += dot / norms if norms > 0 else 0.0
            length_penalty = math.exp(-((len(tokens) - len(ref)) ** 2) / (2 * sigma**2))
            total += length_penalty * similarity / MAX_NGRAM
        scores[i] = 10.0 * total / len(ref_tokens[i])
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = CIDER_SIGMA) -> float:
    """CIDEr-D (Vedantam et al. 2015), averaged over candidates; 10 for a perfect, long-enough match.

    Definition implemented, for candidate ``c`` of image ``i`` with references ``S_i = {s_1..s_m}`` (tokens
    from :func:`caption_tokens`, no stemming) over a set of ``N`` images:

    - ``g^n(x)``: the TF-IDF vector of the n-grams of ``x``, weight ``count(g, x) * log(N / df(g))``,
      where ``df(g)`` is the number of images whose references contain ``g`` (floored at 1). Raw counts
      stand in for the paper's length-normalised term frequency: the cosine is scale-free, and counts
      make the clipping below clip counts, as CIDEr-D intends.
    - ``CIDEr-D_n(c, S_i) = 10/m * sum_j exp(-(|c| - |s_j|)^2 / (2 sigma^2))
      * <min(g^n(c), g^n(s_j)), g^n(s_j)> / (||g^n(c)|| ||g^n(s_j)||)``, a term being 0 when either
      vector is zero (e.g. a sentence shorter than ``n``).
    - ``CIDEr-D(c, S_i) = mean over n = 1..4 of CIDEr-D_n``; the corpus score is the mean over candidates.

    So a candidate equal to its single reference scores 10 when, for every n, it has at least one n-gram
    that some other image's references lack; n-grams that every image's references contain get idf 0
    and count for nothing, a sentence shorter than four tokens scores at most 10 * len / 4, and with a
    single image (N = 1) every score is 0. Document frequencies come from the references passed in, so
    scores depend on the evaluated set, as in the COCO evaluation.
    """
    return float(cider_d_scores(candidates, references, sigma).mean())


# ---------------------------------------------------------------------------------------------------
# Instructions


def normalise_answer(text: str) -> str:
    """Lowercase, strip, drop trailing punctuation ("Red." -> "red") and collapse inner whitespace."""
    return " ".join(text.lower().strip().rstrip(string.punctuation + " ").split())


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answer after :func:`normalise_answer`."""
    _check_paired("predictions", predictions, "answers", answers)
    return float(np.mean([normalise_answer(p) == normalise_answer(a) for p, a in zip(predictions, answers)]))


def accuracy_by_task(
    predictions: Sequence[str], answers: Sequence[str], tasks: Sequence[str],
    held_out: tuple[str, ...] = HELD_OUT_TASKS,
) -> dict[str, float]:
    """Exact-match accuracy per instruction family, plus micro-averaged aggregates.

    Returns one entry per family present in ``tasks``, plus ``all`` (every example), ``held_in`` (the
    examples whose family is not in ``held_out``) and ``held_out`` (those whose family is). Micro
    averages weight examples, not families, so a family with many examples counts for more. An
    aggregate with no examples is left out rather than reported as nan.
    """
    _check_paired("predictions", predictions, "answers", answers)
    _check_paired("predictions", predictions, "tasks", tasks)
    reserved = {"all", "held_in", "held_out"} & set(tasks)
    if reserved:
        raise ValueError(f"task names {sorted(reserved)} collide with the aggregate keys")
    correct = [normalise_answer(p) == normalise_answer(a) for p, a in zip(predictions, answers)]
    return mean_by_task(correct, tasks, held_out)


def mean_by_task(values: Sequence[float], tasks: Sequence[str], held_out: Sequence[str]) -> dict[str, float]:
    """Mean of per-example ``values`` per task, plus the micro-averaged ``all``, ``held_in`` and
    ``held_out`` (an aggregate with no examples is left out)."""
    values, task_array = np.asarray(values, dtype=float), np.array(tasks, dtype=object)
    means = {task: float(values[task_array == task].mean()) for task in dict.fromkeys(tasks)}
    is_held_out = np.array([task in held_out for task in tasks], dtype=bool)
    means["all"] = float(values.mean())
    if (~is_held_out).any():
        means["held_in"] = float(values[~is_held_out].mean())
    if is_held_out.any():
        means["held_out"] = float(values[is_held_out].mean())
    return means


# ---------------------------------------------------------------------------------------------------
# Filtering (CapFilt)


def filter_precision_recall(flagged: Sequence[bool], actually_wrong: Sequence[bool]) -> dict[str, float]:
    """How well the CapFilt filter flags wrong alt-texts ("wrong" is the positive class).

    Returns the confusion counts ``tp``, ``fp``, ``fn``, ``tn`` (ints) and
    ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``, ``f1 = 2 P R / (P + R)``.

    Edge cases, chosen so no entry is ever nan: with no flags precision is 1.0 (no false alarm was
    raised); with nothing wrong recall is 1.0 (nothing was missed); F1 is 0.0 when P + R = 0. These
    vacuous 1.0s cannot flatter a filter: one that flags nothing while texts are wrong has recall 0 and
    F1 0, and F1 is 1.0 only when every wrong text is flagged and nothing else is.
    """
    _check_paired("flagged", flagged, "actually_wrong", actually_wrong)
    flags = np.array([bool(f) for f in flagged])
    wrong = np.array([bool(w) for w in actually_wrong])
    tp, fp = int((flags & wrong).sum()), int((flags & ~wrong).sum())
    fn, tn = int((~flags & wrong).sum()), int((~flags & ~wrong).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": precision, "recall": recall, "f1": f1}

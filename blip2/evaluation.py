"""Held-out evaluation of each training stage on the toy world: retrieval (stage 1), captioning (stage 2)
and instruction following (InstructBLIP).

Each ``evaluate_*`` function runs a model over records of a held-out split (``test``, ``val`` or
``novel``: their alt-texts are correct captions) and hands what it produced to a pure ``score_*``
function, which compares it with the ground truth through :mod:`blip2.metrics`. The scoring functions
take no model, so tests check them with oracle and wrong inputs.

Everything is batched (``batch_size`` images or image-text pairs per forward), runs under
``torch.no_grad()`` with the model in eval mode (its previous mode is restored), and draws whatever it
draws from fixed seeds: equal arguments give equal numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from blip2.backbones.vision import pixel_values
from blip2.metrics import (
    accuracy_by_task,
    attribute_relevance,
    bleu4,
    caption_attribute_accuracy,
    cider_d,
    exact_match,
    identity_relevance,
    recall_at_k,
)
from blip2.models.generation import GREEDY, GenerationParams, generate_answers, generate_captions
from blip2.models.qformer import Blip2QFormerForPretraining
from blip2.models.scoring import rerank_with_itm
from blip2.toyworld.corpus import Record
from blip2.toyworld.text import (
    CAPTION_TEMPLATES,
    HELD_OUT_TASKS,
    INSTRUCTION_TASKS,
    InstructionExample,
    caption,
    caption_matches,
    instruction_example,
    parse_attributes,
)
from blip2.toyworld.world import ATTRIBUTES, Attributes, decode_image

RECALL_KS: tuple[int, ...] = (1, 5)
NUM_REPORT_EXAMPLES = 5  # generated/true pairs kept in a report, for people to read


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _pixels(records: Sequence[Record]) -> Tensor:
    """Decoded, normalised images of ``records``, (B, 3, H, W)."""
    return pixel_values(np.stack([decode_image(r.image) for r in records]))


# ---------------------------------------------------------------------------------------------------
# Retrieval (stage 1)


def retrieval_relevance(captions: Sequence[str], attributes: Sequence[Attributes]) -> dict[str, Tensor]:
    """The four relevance matrices of retrieval among pairs ``(image i, caption i)``, all bool, (N, N).

    - ``t2i_strict`` / ``i2t_strict``: only the paired image (caption) is right.
    - ``t2i_attribute`` (rows captions, columns images): the image has every attribute the caption states
      (:func:`blip2.metrics.attribute_relevance`); in the toy world several images fit one caption.
    - ``i2t_attribute`` (rows images, columns captions): the caption states exactly the image's four
      attributes, i.e. ``t2i_attribute`` transposed, restricted to captions that state all four (a caption
      saying only "red" fits a red image, but it is not that image's description).
    """
    if len(captions) != len(attributes) or not captions:
        raise ValueError(f"need one caption per image, got {len(captions)} captions and {len(attributes)} images")
    positions = range(len(captions))
    strict = identity_relevance(positions, positions)  # (N, N)
    stated = [parse_attributes(text) for text in captions]
    fits = attribute_relevance(stated, [a.as_dict() for a in attributes])  # (T, I)
    complete = torch.tensor([len(s) == len(ATTRIBUTES) for s in stated])  # (T,)
    return {"t2i_strict": strict, "t2i_attribute": fits,
            "i2t_strict": strict.t(), "i2t_attribute": (fits & complete[:, None]).t()}


def score_retrieval(text_to_image: Tensor, image_to_text: Tensor, captions: Sequence[str],
                    attributes: Sequence[Attributes], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@k of rankings among pairs ``(image i, caption i)``.

    Args:
        text_to_image: (N, >= max(ks)) image indices per caption, best first.
        image_to_text: (N, >= max(ks)) caption indices per image, best first.
        captions, attributes: caption i and the attributes of image i.

    Returns:
        ``{direction}_r{k}_{level}`` for direction ``t2i`` / ``i2t``, each k, level ``strict`` /
        ``attribute`` (see :func:`retrieval_relevance`), e.g. ``t2i_r1_attribute``; each in [0, 1].
        With correct captions attribute-level recall is never below strict recall.
    """
    relevance = retrieval_relevance(captions, attributes)
    metrics = {}
    for direction, ranking in (("t2i", text_to_image), ("i2t", image_to_text)):
        for level in ("strict", "attribute"):
            for k in ks:
                recall = recall_at_k(ranking, relevance[f"{direction}_{level}"], (k,))[f"recall@{k}"]
                metrics[f"{direction}_r{k}_{level}"] = recall
    return metrics


@torch.no_grad()
def evaluate_retrieval(model: Blip2QFormerForPretraining, qformer_tokenizer: PreTrainedTokenizerBase,
                       records: Sequence[Record], num_candidates: int = 100, rerank_k: int = 16,
                       max_text_length: int = 32, batch_size: int = 32,
                       rerank_itc_scale: float = 1.0) -> dict[str, float | int]:
    """Text-to-image and image-to-text retrieval among the first ``num_candidates`` records (each image
    against every record's alt-text), as BLIP-2 retrieves: rank by ITC, re-rank the top ``rerank_k`` by ITM
    logit + ``rerank_itc_scale`` * ITC similarity (:func:`blip2.models.scoring.rerank_with_itm`).

    Returns (all recalls in [0, 1], see :func:`score_retrieval` for strict vs attribute-level):

    - ``{t2i,i2t}_r{1,5}_{strict,attribute}``: after the ITM re-rank, e.g. ``t2i_r1_attribute``;
    - the same names ending ``_itc``: ITC ranking alone, e.g. ``t2i_r1_attribute_itc``;
    - the same names ending ``_itm``: ITC's top ``rerank_k`` ranked by ITM alone, e.g. ``t2i_r1_attribute_itm``;
    - ``num_candidates`` (fewer than asked when there are fewer records) and ``rerank_k`` (as used).

    Memory: the frozen image features of all candidates are held (the ITM re-rank needs them);
    every forward sees at most ``batch_size`` images, texts or pairs.
    """
    records = list(records[:num_candidates])
    if not records:
        raise ValueError("no records to evaluate retrieval on")
    captions = [r.alt_text for r in records]
    attributes = [r.attributes for r in records]
    device = model.query_tokens.device
    dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
    text = qformer_tokenizer(captions, padding="longest", truncation=True, max_length=max_text_length,
                             return_tensors="pt")
    input_ids, attention_mask = text.input_ids.to(device), text.attention_mask.to(device)  # (N, T)
    chunks = range(0, len(records), batch_size)
    with _eval_mode(model):
        image_embeds = torch.cat([model.encode_images(_pixels(records[s : s + batch_size]).to(device, dtype))
                                  for s in chunks])  # (N, P, D_vision)
        text_features = torch.cat([model.text_features(input_ids[s : s + batch_size],
                                                       attention_mask[s : s + batch_size]) for s in chunks])  # (N, D)
        similarity = torch.cat([model.itc_similarity(model.image_features(image_embeds[s : s + batch_size]),
                                                     text_features) for s in chunks]).float()  # (N_i, N_t)
        reranked = rerank_with_itm(model, image_embeds, input_ids, attention_mask, similarity, rerank_k, batch_size,
                                   rerank_itc_scale)
        itm_only = rerank_with_itm(model, image_embeds, input_ids, attention_mask, similarity, rerank_k, batch_size,
                                   itc_scale=0.0)
    metrics: dict[str, float | int] = {"num_candidates": len(records), "rerank_k": min(rerank_k, len(records))}
    metrics.update(score_retrieval(reranked.text_to_image.cpu(), reranked.image_to_text.cpu(), captions, attributes))
    itc = score_retrieval(similarity.t().argsort(dim=1, descending=True).cpu(),
                          similarity.argsort(dim=1, descending=True).cpu(), captions, attributes)
    metrics.update({f"{name}_itc": value for name, value in itc.items()})
    itm = score_retrieval(itm_only.text_to_image.cpu(), itm_only.image_to_text.cpu(), captions, attributes)
    metrics.update({f"{name}_itm": value for name, value in itm.items()})
    return metrics


# ---------------------------------------------------------------------------------------------------
# Captioning (stage 2)


def caption_references(attributes: Attributes) -> list[str]:
    """Every caption template's caption of ``attributes``: the references for BLEU and CIDEr."""
    return [caption(attributes, t) for t in range(len(CAPTION_TEMPLATES))]


def score_captions(generated: Sequence[str], attributes: Sequence[Attributes],
                   num_examples: int = NUM_REPORT_EXAMPLES) -> dict[str, Any]:
    """Scores of generated captions, caption i of image i with ``attributes[i]``.

    Returns:
        - ``caption_accuracy``: fraction stating all four attributes, each correctly;
        - ``attribute_accuracy/<name>`` for shape, colour, size, position: fraction stating that
          attribute unambiguously and correctly;
        - ``bleu4`` in [0, 1] and ``cider_d`` in [0, 10+], against :func:`caption_references`;
        - ``num_images``;
        - ``examples``: the first ``num_examples`` ``{"caption": generated, "truth": template-0 caption}``.
    """
    accuracy = caption_attribute_accuracy(generated, attributes)
    references = [caption_references(a) for a in attributes]
    metrics: dict[str, Any] = {"caption_accuracy": accuracy["all"]}
    metrics.update({f"attribute_accuracy/{name}": accuracy[name] for name in ATTRIBUTES})
    metrics["bleu4"] = bleu4(generated, references)
    metrics["cider_d"] = cider_d(generated, references)
    metrics["num_images"] = len(generated)
    metrics["examples"] = [{"caption": text, "truth": caption(a)}
                           for text, a in zip(generated[:num_examples], attributes[:num_examples])]
    return metrics


@torch.no_grad()
def evaluate_captions(model: PreTrainedModel | nn.Module, tokenizer: PreTrainedTokenizerBase,
                      records: Sequence[Record], params: GenerationParams = GREEDY, prompt: str | None = None,
                      batch_size: int = 32, seed: int = 0, max_text_length: int | None = None) -> dict[str, Any]:
    """Caption every record's image with a stage-2 model (``Blip2ForConditionalGeneration``, OPT or T5,
    or a ``Blip2Stage2`` around one) and score the captions with :func:`score_captions`.

    ``prompt``, when given, is fed to every image and is not part of the scored caption (what
    ``generate`` returns after it), as BLIP-2 scores prompted captions. ``params`` must return one
    sequence per image; sampling is seeded per batch from ``seed``.
    """
    if params.num_return_sequences != 1:
        raise ValueError("caption evaluation scores one caption per image: set num_return_sequences=1")
    if not records:
        raise ValueError("no records to caption")
    generated: list[str] = []
    with _eval_mode(model):
        for index, start in enumerate(range(0, len(records), batch_size)):
            batch = records[start : start + batch_size]
            prompts = None if prompt is None else [prompt] * len(batch)
            generated += generate_captions(model, tokenizer, _pixels(batch), prompts, params, seed=seed + index,
                                           max_text_length=max_text_length)
    return score_captions(generated, [r.attributes for r in records])


# ---------------------------------------------------------------------------------------------------
# Instructions (InstructBLIP)


@dataclass(frozen=True)
class InstructionItem:
    """One evaluation question: ``example`` is about the image of ``records[record]``."""

    record: int
    attributes: Attributes
    example: InstructionExample


def draw_instructions(records: Sequence[Record], tasks: Sequence[str] = tuple(INSTRUCTION_TASKS),
                      examples_per_task: int | None = None, seed: int = 0) -> list[InstructionItem]:
    """One instruction of each family in ``tasks`` for each of the first ``examples_per_task`` records
    (all when None), task by task. Every family has its own generator, derived from ``(seed, family)``,
    so evaluating a subset of families asks the same questions of them."""
    unknown = [t for t in tasks if t not in INSTRUCTION_TASKS]
    if unknown or len(set(tasks)) != len(tasks) or not tasks:
        raise ValueError(f"tasks must be distinct families of {tuple(INSTRUCTION_TASKS)}, got {tuple(tasks)}")
    chosen = records if examples_per_task is None else records[:examples_per_task]
    if not chosen:
        raise ValueError("no records to ask instructions about")
    items = []
    for task in tasks:
        rng = np.random.default_rng([seed, tuple(INSTRUCTION_TASKS).index(task)])
        items += [InstructionItem(i, r.attributes, instruction_example(task, r.attributes, rng))
                  for i, r in enumerate(chosen)]
    return items


def score_answers(generated: Sequence[str], items: Sequence[InstructionItem],
                  held_out: tuple[str, ...] = HELD_OUT_TASKS,
                  num_examples_per_task: int = 1) -> dict[str, Any]:
    """Scores of generated answers, answer i to ``items[i]``.

    ``describe`` is scored by :func:`caption_matches` (all four attributes stated correctly), not by
    exact match: its reference is one caption template out of many equally right phrasings ("there is a
    small red circle on the left" answers "describe the image." as well as "a small red circle on the
    left"), and exact match would score a model by the phrasing it happens to prefer. Every other family
    has one right answer, a word, scored by exact match after normalisation.

    Returns:
        - ``accuracy/<family>`` per family, ``accuracy/all``, ``accuracy/held_in``, ``accuracy/held_out``
          (:func:`blip2.metrics.accuracy_by_task`, micro-averaged; an aggregate with no examples is absent);
        - ``describe_exact_match`` when ``describe`` was asked: its strict exact-match accuracy, for reference;
        - ``num_examples``;
        - ``examples``: the first ``num_examples_per_task`` of each family, with ``task``, ``instruction``,
          ``answer``, ``generated`` and ``correct``.
    """
    if len(generated) != len(items):
        raise ValueError(f"{len(generated)} answers for {len(items)} instructions")
    tasks = [item.example.task for item in items]
    answers = [item.example.answer for item in items]
    # A description stating the right attributes counts as the reference answer, whatever its wording.
    scored = [item.example.answer if item.example.task == "describe" and caption_matches(text, item.attributes)
              else text for text, item in zip(generated, items)]
    accuracy = accuracy_by_task(scored, answers, tasks, held_out)
    metrics: dict[str, Any] = {f"accuracy/{name}": value for name, value in accuracy.items()}
    describe = [i for i, task in enumerate(tasks) if task == "describe"]
    if describe:
        metrics["describe_exact_match"] = exact_match([generated[i] for i in describe], [answers[i] for i in describe])
    metrics["num_examples"] = len(items)
    shown: dict[str, int] = {}
    examples = []
    for text, score, item in zip(generated, scored, items):
        if shown.get(item.example.task, 0) < num_examples_per_task:
            shown[item.example.task] = shown.get(item.example.task, 0) + 1
            examples.append({"task": item.example.task, "instruction": item.example.instruction,
                             "answer": item.example.answer, "generated": text,
                             "correct": exact_match([score], [item.example.answer]) == 1.0})
    metrics["examples"] = examples
    return metrics


@torch.no_grad()
def evaluate_instructions(model: PreTrainedModel | nn.Module, tokenizer: PreTrainedTokenizerBase,
                          qformer_tokenizer: PreTrainedTokenizerBase, records: Sequence[Record],
                          tasks: Sequence[str] = tuple(INSTRUCTION_TASKS), examples_per_task: int | None = None,
                          seed: int = 0, batch_size: int = 32, params: GenerationParams = GREEDY,
                          held_out: tuple[str, ...] = HELD_OUT_TASKS, max_qformer_length: int | None = None,
                          max_text_length: int | None = None) -> dict[str, Any]:
    """Ask an InstructBLIP model (``InstructBlipForConditionalGeneration`` or a ``Blip2Stage2`` around
    one) the questions of :func:`draw_instructions` and score its answers with :func:`score_answers`.

    ``held_out`` names the families kept out of instruction tuning (zero-shot), for the aggregates.
    Sampling, if ``params`` samples, is seeded per batch from ``seed``.
    """
    if params.num_return_sequences != 1:
        raise ValueError("instruction evaluation scores one answer per question: set num_return_sequences=1")
    items = draw_instructions(records, tasks, examples_per_task, seed)
    generated: list[str] = []
    with _eval_mode(model):
        for index, start in enumerate(range(0, len(items), batch_size)):
            batch = items[start : start + batch_size]
            generated += generate_answers(
                model, tokenizer, _pixels([records[item.record] for item in batch]),
                [item.example.instruction for item in batch], params, qformer_tokenizer=qformer_tokenizer,
                seed=seed + index, max_qformer_length=max_qformer_length, max_text_length=max_text_length)
    return score_answers(generated, items, held_out)

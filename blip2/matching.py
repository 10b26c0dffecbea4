"""Image-text matching (ITM) as a metric of its own: does the cross-encoder tell a caption that fits an
image from one that does not?

For each held-out image three captions are scored: a right one (its own attributes), a one-attribute-wrong
one (exactly one of shape, colour, size, position changed: the hard case) and a random wrong one (another
image's attributes, different from its own). Two numbers per kind of wrong caption:

- *pairwise* accuracy: the fraction of images whose right caption gets a higher P(match) than the wrong
  one (ties count half), so a constant answer scores 0.5;
- *balanced* accuracy at 0.5: the mean of the accuracy on right pairs (P > 0.5) and on wrong pairs
  (P < 0.5), with one right and one wrong pair per image, so a constant answer also scores 0.5.

:func:`score_matching` takes probabilities only (tests check it with oracle and constant inputs);
:func:`matching_pairs` draws the captions from fixed seeds, so equal arguments give equal numbers;
:func:`pair_probabilities` scores any captions against the records' images (what ``/v1/match`` serves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from blip2.backbones.vision import pixel_values
from blip2.models.qformer import Blip2QFormerForPretraining
from blip2.models.scoring import itm_probability
from blip2.toyworld.corpus import Record
from blip2.toyworld.text import random_caption
from blip2.toyworld.world import ATTRIBUTES, Attributes, all_attributes, decode_image

WRONG_KINDS: tuple[str, ...] = ("one_attribute", "random")


@dataclass(frozen=True)
class MatchingPairs:
    """Per image: a right caption and one of each wrong kind (``wrong[kind][i]``)."""

    right: list[str]
    wrong: dict[str, list[str]]


def one_attribute_wrong(attributes: Attributes, rng: np.random.Generator, name: str | None = None) -> Attributes:
    """``attributes`` with exactly one of the four (``name``; None: a random one) changed to another value."""
    if name is None:
        name = tuple(ATTRIBUTES)[int(rng.integers(len(ATTRIBUTES)))]
    elif name not in ATTRIBUTES:
        raise ValueError(f"no attribute {name!r}; one of {', '.join(ATTRIBUTES)}")
    others = [v for v in ATTRIBUTES[name] if v != getattr(attributes, name)]
    return attributes.replace(**{name: others[int(rng.integers(len(others)))]})


def matching_pairs(attributes: Sequence[Attributes], seed: int = 0) -> MatchingPairs:
    """Captions (random templates) for each image's right, one-attribute-wrong and random-wrong pair."""
    rng = np.random.default_rng(seed)
    pool = all_attributes()
    right, one, random = [], [], []
    for truth in attributes:
        right.append(random_caption(truth, rng))
        one.append(random_caption(one_attribute_wrong(truth, rng), rng))
        other = truth
        while other == truth:
            other = pool[int(rng.integers(len(pool)))]
        random.append(random_caption(other, rng))
    return MatchingPairs(right, {"one_attribute": one, "random": random})


def score_matching(p_right: Tensor, p_wrong: dict[str, Tensor]) -> dict[str, float]:
    """``itm_pairwise_<kind>``, ``itm_balanced_<kind>`` for every wrong kind, and ``itm_right_accuracy``
    (P > 0.5 on right pairs); each in [0, 1]. ``p_right`` (N,) and each ``p_wrong[kind]`` (N,) are
    P(match) of image i with its right and its wrong caption."""
    metrics = {"itm_right_accuracy": float((p_right > 0.5).float().mean())}
    for kind, wrong in p_wrong.items():
        if wrong.shape != p_right.shape:
            raise ValueError(f"{kind}: {tuple(wrong.shape)} probabilities for {tuple(p_right.shape)} right pairs")
        wins = (p_right > wrong).float() + 0.5 * (p_right == wrong).float()
        metrics[f"itm_pairwise_{kind}"] = float(wins.mean())
        metrics[f"itm_balanced_{kind}"] = float(((p_right > 0.5).float().mean() + (wrong < 0.5).float().mean()) / 2)
    return metrics


@torch.no_grad()
def match_probabilities(model: Blip2QFormerForPretraining, tokenizer: PreTrainedTokenizerBase,
                        image_embeds: Tensor, texts: Sequence[str], max_text_length: int = 32,
                        batch_size: int = 64) -> Tensor:
    """P(match) of (image i, text i), (N,). ``image_embeds`` are the frozen encoder's outputs."""
    text = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_text_length, return_tensors="pt")
    device = image_embeds.device
    return itm_probability(model, image_embeds, text.input_ids.to(device), text.attention_mask.to(device),
                           batch_size).float().cpu()


@torch.no_grad()
def pair_probabilities(model: Blip2QFormerForPretraining, tokenizer: PreTrainedTokenizerBase,
                       records: Sequence[Record], texts: dict[str, Sequence[str]], max_text_length: int = 32,
                       batch_size: int = 64) -> dict[str, Tensor]:
    """P(match) of record i's image with ``texts[name][i]``, (N,) for every name. The images are decoded as
    training decodes them (``pixel_values``); the model's train/eval mode is restored."""
    device = model.query_tokens.device
    dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
    was_training = model.training
    model.eval()
    try:
        image_embeds = torch.cat([
            model.encode_images(pixel_values(np.stack([decode_image(r.image) for r in records[s : s + batch_size]]))
                                .to(device, dtype)) for s in range(0, len(records), batch_size)])
        return {name: match_probabilities(model, tokenizer, image_embeds, captions, max_text_length, batch_size)
                for name, captions in texts.items()}
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_matching(model: Blip2QFormerForPretraining, tokenizer: PreTrainedTokenizerBase,
                      records: Sequence[Record], num_images: int = 200, seed: int = 0, max_text_length: int = 32,
                      batch_size: int = 64) -> dict[str, float | int]:
    """:func:`score_matching` on the first ``num_images`` records (their images and true attributes; the
    alt-texts are not read), plus ``itm_num_images``. The model's train/eval mode is restored."""
    records = list(records[:num_images])
    if not records:
        raise ValueError("no records to evaluate matching on")
    pairs = matching_pairs([r.attributes for r in records], seed)
    p = pair_probabilities(model, tokenizer, records, {"right": pairs.right, **pairs.wrong}, max_text_length,
                           batch_size)
    p_right = p.pop("right")
    return {**score_matching(p_right, p), "itm_num_images": len(records)}

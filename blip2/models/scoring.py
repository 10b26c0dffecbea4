"""Features, scores and retrieval from a stage-1 model: what CapFilt, evaluation and serving call.

All functions take the frozen encoder's ``image_embeds`` (``model.encode_images(pixel_values)``), so a
caller that scores one image against many texts encodes it once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from blip2.models.qformer import Blip2QFormerForPretraining


@torch.no_grad()
def multimodal_embeddings(model: Blip2QFormerForPretraining, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> torch.Tensor:
    """Query outputs that have seen both the image and the text (ITM's view), (B, Q, H)."""
    return model.qformer_pass(image_embeds, input_ids, attention_mask, "itm").query_output


@torch.no_grad()
def itm_probability(model: Blip2QFormerForPretraining, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """P(match) of aligned pairs (image i, text i), (B,). Batched to bound memory."""
    chunks = [model.itm_logits(image_embeds[i : i + batch_size], input_ids[i : i + batch_size],
                               attention_mask[i : i + batch_size]).softmax(-1)[:, 1]
              for i in range(0, len(input_ids), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def itc_similarity(model: Blip2QFormerForPretraining, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every image with every text (max over queries), (B_i, B_t)."""
    return model.itc_similarity(model.image_features(image_embeds), model.text_features(input_ids, attention_mask))


@dataclass
class Retrieval:
    """Rankings, best first. ``text_to_image[t]``: image indices for text t, (B_t, B_i);
    ``image_to_text[i]``: text indices for image i, (B_i, B_t)."""

    text_to_image: torch.Tensor
    image_to_text: torch.Tensor


@torch.no_grad()
def retrieve(model: Blip2QFormerForPretraining, image_embeds: torch.Tensor, input_ids: torch.Tensor,
             attention_mask: torch.Tensor, k: int = 16, batch_size: int = 64) -> Retrieval:
    """Rank by ITC, then re-rank each query's top ``k`` by ITM logit + ITC similarity (BLIP-2's recipe:
    the cheap bi-encoder shortlists, the expensive cross-encoder decides)."""
    similarity = itc_similarity(model, image_embeds, input_ids, attention_mask)  # (B_i, B_t)
    return rerank_with_itm(model, image_embeds, input_ids, attention_mask, similarity, k, batch_size)


@torch.no_grad()
def rerank_with_itm(model: Blip2QFormerForPretraining, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, similarity: torch.Tensor, k: int = 16,
                    batch_size: int = 64, itc_scale: float = 1.0) -> Retrieval:
    """Rank by the ITC ``similarity`` (B_i, B_t), then re-rank each query's top ``k`` by
    ITM logit + ``itc_scale`` * ITC similarity.

    ``itc_scale=1`` is BLIP-2's sum (ITM logit plus cosine similarity); 0 ranks the top ``k`` by ITM alone.
    The ITM passes run ``batch_size`` (query, candidate) pairs at a time across all queries.
    image_embeds (B_i, P, D_vision); input_ids / attention_mask (B_t, T)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if itc_scale < 0:
        raise ValueError(f"itc_scale must be >= 0, got {itc_scale}")

    def itm_logit(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        logits = model.itm_logits(image_embeds[images], input_ids[texts], attention_mask[texts])  # (b, 2)
        return (logits[:, 1] - logits[:, 0]).float()

    return Retrieval(
        text_to_image=_rerank(similarity.t(), k, lambda texts, images: itm_logit(images, texts), batch_size,
                              itc_scale),
        image_to_text=_rerank(similarity, k, itm_logit, batch_size, itc_scale),
    )


def _rerank(similarity: torch.Tensor, k: int, pair_logit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            batch_size: int, itc_scale: float = 1.0) -> torch.Tensor:
    """similarity (R, C) -> ranking (R, C): each row's top k re-ordered by ``pair_logit(rows, columns)``
    + ``itc_scale`` * similarity, then the rest in ITC order."""
    order = similarity.argsort(dim=1, descending=True)  # (R, C)
    k = min(k, similarity.shape[1])
    top = order[:, :k]  # (R, k)
    rows = torch.arange(similarity.shape[0], device=similarity.device).repeat_interleave(k)  # (R*k,)
    columns = top.reshape(-1)  # (R*k,)
    logits = torch.cat([pair_logit(rows[s : s + batch_size], columns[s : s + batch_size])
                        for s in range(0, len(rows), batch_size)])
    rescored = logits.view(-1, k) + itc_scale * similarity.gather(1, top)  # (R, k)
    order[:, :k] = top.gather(1, rescored.argsort(dim=1, descending=True))
    return order

"""Features, scores and retrieval from a stage-1 model: what CapFilt, evaluation and serving call.

All functions take the frozen encoder's ``image_embeds`` (``model.encode_images(pixel_values)``), so a
caller that scores one image against many texts encodes it once.
"""

from __future__ import annotations

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
             attention_mask: torch.Tensor, k: int = 16) -> Retrieval:
    """Rank by ITC, then re-rank each query's top ``k`` by ITM logit + ITC similarity (BLIP-2's recipe:
    the cheap bi-encoder shortlists, the expensive cross-encoder decides)."""
    similarity = itc_similarity(model, image_embeds, input_ids, attention_mask)  # (B_i, B_t)
    return Retrieval(
        text_to_image=_rerank(similarity.t(), k, lambda t, images: _itm_logit(
            model, image_embeds[images], input_ids[t].expand(len(images), -1),
            attention_mask[t].expand(len(images), -1))),
        image_to_text=_rerank(similarity, k, lambda i, texts: _itm_logit(
            model, image_embeds[i].expand(len(texts), -1, -1), input_ids[texts], attention_mask[texts])),
    )


def _itm_logit(model: Blip2QFormerForPretraining, image_embeds: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> torch.Tensor:
    logits = model.itm_logits(image_embeds, input_ids, attention_mask)  # (k, 2)
    return logits[:, 1] - logits[:, 0]


def _rerank(similarity: torch.Tensor, k: int, score) -> torch.Tensor:
    """similarity (R, C) -> ranking (R, C): top-k columns of each row re-ordered by ``score``, then the rest."""
    order = similarity.argsort(dim=1, descending=True)
    k = min(k, similarity.shape[1])
    for row in range(similarity.shape[0]):
        top = order[row, :k]
        rescored = score(row, top) + similarity[row, top]
        order[row, :k] = top[rescored.argsort(descending=True)]
    return order

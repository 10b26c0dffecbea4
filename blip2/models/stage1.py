"""Stage 1, assembled: build the Q-Former model, compute ITC + ITM + ITG, initialise from BERT.

The objective is a module apart from the model (open_clip's pattern): it receives its distributed
context (``rank``, ``world_size``, the gather function) instead of reading globals, so one process
with no process group works and a test can stand in for the other workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertModel, Blip2Config, Blip2VisionModel

from blip2.models.losses import GatherFn, ItcLoss, ItgLoss, ItmLoss, gather_features, itm_batch, sample_hard_negatives
from blip2.models.qformer import Blip2QFormerForPretraining, build_qformer_config
from blip2.tokenization import DEC_TOKEN



def build_stage1_model(vision_path: str | Path, qformer_tokenizer_path: str | Path, num_query_tokens: int = 8,
                       image_text_hidden_size: int = 256, hidden_size: int = 128, num_layers: int = 2,
                       num_heads: int = 4, intermediate_size: int = 512, cross_attention_frequency: int = 1,
                       max_text_length: int = 64, dropout: float = 0.0, temperature: float = 0.07,
                       bert_path: str | Path | None = None) -> Blip2QFormerForPretraining:
    """A stage-1 model over the frozen image encoder at ``vision_path`` (any ``from_pretrained`` source).

    Defaults are the toy preset. With ``bert_path``, the Q-Former's self-attention, feed-forward and
    embeddings start from that BERT checkpoint (its sizes then win), as the paper starts from BERT-base.
    """
    vision_model = Blip2VisionModel.from_pretrained(vision_path)
    tokenizer = AutoTokenizer.from_pretrained(qformer_tokenizer_path)
    if bert_path is not None:
        bert = BertModel.from_pretrained(bert_path).config
        hidden_size, num_layers, num_heads = bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads
        intermediate_size, max_text_length = bert.intermediate_size, bert.max_position_embeddings
    qformer_config = build_qformer_config(
        vision_model.config.hidden_size, len(tokenizer), hidden_size, num_layers, num_heads, intermediate_size,
        cross_attention_frequency, max_text_length, tokenizer.pad_token_id, dropout, use_qformer_text_input=True)
    config = Blip2Config(vision_config=vision_model.config.to_dict(), qformer_config=qformer_config.to_dict(),
                         num_query_tokens=num_query_tokens, image_text_hidden_size=image_text_hidden_size)
    model = Blip2QFormerForPretraining(config, vision_model, tokenizer.convert_tokens_to_ids(DEC_TOKEN), temperature)
    if bert_path is not None:
        init_qformer_from_bert(model, bert_path)
    return model


def init_qformer_from_bert(model: Blip2QFormerForPretraining, bert_path: str | Path) -> list[str]:
    """Copy a BERT checkpoint's embeddings, self-attention and feed-forward into the Q-Former; the
    query branch's feed-forward starts as a copy of the text one, cross-attention stays random.

    The word embeddings are copied only when the vocabularies have the same size (a BERT checkpoint
    comes with its own tokenizer, which the Q-Former must then use). Returns the copied names."""
    bert = BertModel.from_pretrained(bert_path).state_dict()
    ours = model.state_dict()
    mapping = {"embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
               "qformer.layernorm.weight": "embeddings.LayerNorm.weight",
               "qformer.layernorm.bias": "embeddings.LayerNorm.bias"}
    if ours["embeddings.word_embeddings.weight"].shape == bert["embeddings.word_embeddings.weight"].shape:
        mapping["embeddings.word_embeddings.weight"] = "embeddings.word_embeddings.weight"
    for name in ours:
        if not name.startswith("qformer.encoder.layer.") or ".crossattention." in name:
            continue
        source = name.removeprefix("qformer.").replace("intermediate_query", "intermediate").replace(
            "output_query", "output").replace(".attention.attention.", ".attention.self.")
        if source in bert:
            mapping[name] = source
    copied = {ours_name: bert[bert_name] for ours_name, bert_name in mapping.items()
              if ours[ours_name].shape == bert[bert_name].shape}
    model.load_state_dict(copied, strict=False)
    return sorted(copied)


@dataclass
class Stage1Output:
    """The three stage-1 losses and their weighted sum (what is optimised), and what ITM's training looks
    like (``diagnostics``, no gradient, see :func:`itm_diagnostics`)."""

    loss: torch.Tensor
    itc_loss: torch.Tensor
    itm_loss: torch.Tensor
    lm_loss: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def itm_diagnostics(logits: torch.Tensor, labels: torch.Tensor, positive_mask: torch.Tensor,
                    negative_text: torch.Tensor, negative_image: torch.Tensor,
                    attributes: torch.Tensor | None, attributes_all: torch.Tensor | None,
                    random_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """How ITM is doing on its own training batch, each a scalar:

    - ``itm_acc_positive`` / ``itm_acc_hard``: accuracy (argmax) on the matched rows and on the sampled
      hard negatives (rows labelled 0);
    - ``itm_acc_random``: accuracy on ``random_logits``, image i with a uniformly drawn non-positive text
      (given only when the caller ran that extra pass);
    - ``itm_negatives_available``: the share of the global batch that is not a positive of a pair (what
      the duplicate-caption mask leaves to the sampler);
    - ``itm_negative_attributes_differing``: how many of the stated attributes differ between a pair and
      its sampled negative (mean over text and image negatives; 0 would be a duplicate), when
      ``attributes`` (B, A) and ``attributes_all`` (N, A) are given (-1: not stated, counted as differing
      only when the other side states it).
    """
    predicted = logits.argmax(dim=-1)
    positive, negative = labels == 1, labels == 0
    out = {"itm_acc_positive": (predicted[positive] == 1).float().mean() if positive.any() else logits.new_tensor(0.0),
           "itm_acc_hard": (predicted[negative] == 0).float().mean() if negative.any() else logits.new_tensor(0.0),
           "itm_negatives_available": (~positive_mask).float().mean()}
    if random_logits is not None:
        out["itm_acc_random"] = (random_logits.argmax(dim=-1) == 0).float().mean()
    if attributes is not None and attributes_all is not None:
        text_side = (attributes != attributes_all[negative_text]).sum(dim=-1).float()  # (B,)
        image_side = (attributes != attributes_all[negative_image]).sum(dim=-1).float()  # (B,)
        out["itm_negative_attributes_differing"] = torch.cat([text_side, image_side]).mean()
    return out


class Stage1Objective(nn.Module):
    """ITC + ITM (hard negatives mined from ITC) + ITG, over this worker's batch.

    ``input_ids`` must have the same length on every worker (pad to a fixed length), since ITM gathers
    them. ``ids`` marks pairs known to match (same image or same caption): they are not negatives.

    ``itm_weight`` scales ITM in the summed loss (BLIP-2: 1), ``itc_weight`` and ``itg_weight`` ITC and ITG
    (1; 0 ablates one, as BLIP-2's ITG ablation does); ``itm_random_negatives`` is the share of ITM
    negatives drawn uniformly instead of by ITC hardness (BLIP-2: 0; see :func:`sample_hard_negatives`)."""

    def __init__(self, rank: int = 0, world_size: int = 1, label_smoothing: float = 0.1,
                 gather: GatherFn = gather_features, itm_weight: float = 1.0,
                 itm_random_negatives: float = 0.0, diagnostics: bool = False, itc_weight: float = 1.0,
                 itg_weight: float = 1.0) -> None:
        super().__init__()
        self.diagnostics = diagnostics  # fill Stage1Output.diagnostics (one small extra ITM pass per step)
        self._diagnostic_generator: torch.Generator | None = None  # see _diagnose
        self.rank, self.world_size, self.gather = rank, world_size, gather
        self.itm_weight, self.itm_random_negatives = itm_weight, itm_random_negatives
        self.itc_weight, self.itg_weight = itc_weight, itg_weight
        self.itc = ItcLoss(rank, world_size, label_smoothing, gather=gather)
        self.itm = ItmLoss()
        self.itg = ItgLoss(label_smoothing)

    def forward(self, model: Blip2QFormerForPretraining, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None, image_embeds: torch.Tensor | None = None,
                attributes: torch.Tensor | None = None) -> Stage1Output:
        """Either ``pixel_values`` (B, 3, H, W) or the frozen encoder's ``image_embeds`` (B, N, D_vision),
        precomputed by a feature cache (the encoder is frozen and deterministic, so they are the same).
        ``attributes`` (B, A) long, what each caption states (-1: nothing), only feeds the diagnostics."""
        if image_embeds is None:
            image_embeds = model.encode_images(pixel_values)  # (B, N, D_vision), frozen

        # 1. ITC: queries and text in one pass under the uni-modal mask.
        itc_pass = model.qformer_pass(image_embeds, input_ids, attention_mask, "itc")
        image_feats = nn.functional.normalize(model.vision_projection(itc_pass.query_output), dim=-1)  # (B, Q, D)
        text_feat = nn.functional.normalize(model.text_projection(itc_pass.text_output[:, 0]), dim=-1)  # (B, D)
        itc = self.itc(image_feats, text_feat, model.temperature(), ids=ids)

        # 2. ITM: each image with its text, a hard negative text, and each text with a hard negative image.
        with torch.no_grad():
            negative_text, negative_image = sample_hard_negatives(
                itc.sim_i2t, itc.sim_t2i, itc.positive_mask, self.rank, generator, self.itm_random_negatives)
        input_ids_all = self.gather(input_ids, self.rank, self.world_size, False)  # (N, T)
        attention_mask_all = self.gather(attention_mask, self.rank, self.world_size, False)  # (N, T)
        batch = itm_batch(
            image_embeds, self.gather(image_embeds, self.rank, self.world_size, True), input_ids, input_ids_all,
            attention_mask, attention_mask_all, negative_text, negative_image, itc.positive_mask)
        itm_logits = model.itm_logits(batch.image_embeds, batch.input_ids, batch.attention_mask)  # (3B, 2)
        itm = self.itm(itm_logits, batch.labels)
        diagnostics = self._diagnose(model, image_embeds, input_ids_all, attention_mask_all, batch.labels, itm_logits,
                                     itc.positive_mask, negative_text, negative_image, attributes,
                                     generator) if self.diagnostics else {}

        # 3. ITG: the caption from [DEC], under the multimodal-causal mask.
        logits, decoder_ids = model.itg_logits(image_embeds, input_ids, attention_mask)  # (B, T, V)
        itg = self.itg(logits, decoder_ids.masked_fill(attention_mask == 0, -100))

        loss = self.itc_weight * itc.itc_loss + self.itm_weight * itm.itm_loss + self.itg_weight * itg.lm_loss
        return Stage1Output(loss, itc.itc_loss, itm.itm_loss, itg.lm_loss, diagnostics)

    @torch.no_grad()
    def _diagnose(self, model, image_embeds, input_ids_all, attention_mask_all, labels, itm_logits, positive_mask,
                  negative_text, negative_image, attributes, generator) -> dict[str, torch.Tensor]:
        """:func:`itm_diagnostics`, with an extra no-gradient ITM pass of every local image against a
        uniformly drawn non-positive text of the global batch (the random-negative accuracy)."""
        # Draws of its own: the training generator must not advance here, or turning the diagnostics on
        # would change which hard negatives training samples (and so the trained model) for a given seed.
        if self._diagnostic_generator is None:
            seed = generator.initial_seed() + 1 if generator is not None else torch.initial_seed() + 1
            self._diagnostic_generator = torch.Generator(device=positive_mask.device).manual_seed(seed)
        flat = torch.zeros(positive_mask.shape, device=positive_mask.device)  # uniform over non-positives
        random_text, _ = sample_hard_negatives(flat, flat, positive_mask, self.rank, self._diagnostic_generator,
                                               random_fraction=1.0)
        random_logits = model.itm_logits(image_embeds, input_ids_all[random_text], attention_mask_all[random_text])
        attributes_all = (self.gather(attributes, self.rank, self.world_size, False)
                          if attributes is not None else None)
        return itm_diagnostics(itm_logits.detach(), labels, positive_mask, negative_text, negative_image,
                               attributes, attributes_all, random_logits)

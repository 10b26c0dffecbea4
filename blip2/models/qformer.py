"""Stage 1: the Q-Former with its image-text heads, over a frozen image encoder.

Built from transformers' modules, named as transformers' ``Blip2ForImageTextRetrieval`` names them
(``vision_model``, ``query_tokens``, ``embeddings``, ``qformer``, ``vision_projection``,
``text_projection``, ``itm_head``) so that its state dict maps 1:1 onto that class; plus what transformers
does not ship: the ITG language-model head (``itg_head``, tied to the word embeddings) and the learnable
ITC temperature (``temp``).

Each objective is one Q-Former pass over ``[queries; text]`` with its own attention mask
(:func:`blip2.models.masks.qformer_attention_mask`):

- ITC (uni-modal mask): query outputs see only queries and the image, text outputs see only text;
- ITM (bidirectional mask): queries and text see each other; the ITM head reads the query outputs;
- ITG (multimodal-causal mask): text, starting with ``[DEC]``, sees all queries and earlier text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2Config, Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from blip2.models.masks import qformer_attention_mask

TEMPERATURE_RANGE = (0.001, 0.5)  # clamp of the learnable ITC temperature, as the paper's code does


def build_qformer_config(vision_hidden_size: int, vocab_size: int, hidden_size: int = 128, num_layers: int = 2,
                         num_heads: int = 4, intermediate_size: int = 512, cross_attention_frequency: int = 1,
                         max_position_embeddings: int = 64, pad_token_id: int = 0, dropout: float = 0.0,
                         *, use_qformer_text_input: bool) -> Blip2QFormerConfig:
    """A Q-Former config. ``vocab_size`` is ``len(qformer_tokenizer)``; ``use_qformer_text_input`` turns
    the text branch on: stage 1 and InstructBLIP need it, stage 2 reads no text and must leave it off
    (its unused weights would get no gradient, which DDP rejects).

    The defaults are the toy preset; the paper's Q-Former is BERT-base (768 wide, 12 layers, 12 heads,
    3072 FFN, cross-attention every 2nd layer, dropout 0.1)."""
    return Blip2QFormerConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        cross_attention_frequency=cross_attention_frequency, encoder_hidden_size=vision_hidden_size,
        max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        use_qformer_text_input=use_qformer_text_input,
    )


class ItgHead(nn.Module):
    """BERT's LM-prediction head: transform, then a decoder tied to the word embeddings."""

    def __init__(self, config: Blip2QFormerConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.GELU()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.word_embeddings = word_embeddings  # shared, not a copy: ITG reads and writes one vocabulary

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> logits (B, T, V)."""
        x = self.layer_norm(self.activation(self.dense(hidden_states)))
        return x @ self.word_embeddings.weight.t() + self.bias


@dataclass
class QFormerPass:
    """Outputs of one Q-Former pass over ``[queries; text]``."""

    query_output: torch.Tensor  # (B, Q, H)
    text_output: torch.Tensor | None  # (B, T, H)


class Blip2QFormerForPretraining(nn.Module):
    """Frozen image encoder + Q-Former + ITC/ITM/ITG heads (stage 1). See the module docstring."""

    def __init__(self, config: Blip2Config, vision_model: Blip2VisionModel, dec_token_id: int | None,
                 temperature: float = 0.07) -> None:
        """``dec_token_id`` None builds no ITG head: a retrieval model (ITC and ITM only), as
        ``Blip2ForImageTextRetrieval`` checkpoints published without one load."""
        super().__init__()
        qformer_config = config.qformer_config
        if not qformer_config.use_qformer_text_input:
            raise ValueError("stage 1 needs the Q-Former's text branch: set use_qformer_text_input=True")
        self.config = config
        self.dec_token_id = dec_token_id
        self.vision_model = vision_model
        self.query_tokens = nn.Parameter(
            torch.randn(1, config.num_query_tokens, qformer_config.hidden_size) * qformer_config.initializer_range)
        self.embeddings = Blip2TextEmbeddings(qformer_config)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.vision_projection = nn.Linear(qformer_config.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(qformer_config.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(qformer_config.hidden_size, 2)
        self.itg_head = None if dec_token_id is None else ItgHead(qformer_config, self.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        # nn.Embedding's default N(0, 1) is far too large beside BERT-style 0.02 weights.
        for module in (self.embeddings.word_embeddings, self.embeddings.position_embeddings):
            nn.init.normal_(module.weight, std=qformer_config.initializer_range)
        self.freeze_vision_model()

    # -- freezing -----------------------------------------------------------------------------------

    def freeze_vision_model(self) -> None:
        """The image encoder never trains: no gradients, and eval mode (see ``train``)."""
        self.vision_model.requires_grad_(False)
        self.vision_model.eval()

    def train(self, mode: bool = True) -> Blip2QFormerForPretraining:
        super().train(mode)
        self.vision_model.eval()  # frozen: dropout / norm statistics stay as pretrained
        return self

    # -- passes -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen image features, (B, 3, H, W) -> (B, N, D_vision)."""
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def qformer_pass(self, image_embeds: torch.Tensor, input_ids: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, kind: str) -> QFormerPass:
        """One pass over ``[queries; text]`` with the ``kind`` ("itc", "itm", "itg") attention mask.

        image_embeds (B, N, D_vision); input_ids / attention_mask (B, T), or None for queries alone."""
        batch = image_embeds.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)  # (B, Q, H)
        num_queries = queries.shape[1]
        if input_ids is None:
            embeds, mask = queries, None
        else:
            embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)  # (B, Q+T, H)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            mask = qformer_attention_mask(kind, num_queries, attention_mask, dtype=embeds.dtype)
        # No encoder mask: every image position is attended. (An all-ones mask is the same on real
        # tensors, where transformers drops it; on fake tensors, which blip2.planning runs, it cannot
        # check the mask is all ones and builds one for Q+T positions, too long for the Q that
        # cross-attend.)
        hidden = self.qformer(query_embeds=embeds, query_length=num_queries, attention_mask=mask,
                              encoder_hidden_states=image_embeds).last_hidden_state  # (B, Q+T, H)
        text = hidden[:, num_queries:] if input_ids is not None else None
        return QFormerPass(hidden[:, :num_queries], text)

    def text_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone through the Q-Former's text branch (no image), (B, T) -> (B, T, H)."""
        embeds = self.embeddings(input_ids=input_ids)
        mask = qformer_attention_mask("itc", 0, attention_mask, dtype=embeds.dtype)
        return self.qformer(query_embeds=embeds, query_length=0, attention_mask=mask).last_hidden_state

    # -- features and scores (retrieval, CapFilt, serving) ------------------------------------------

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised per-query ITC features, (B, N, D_vision) -> (B, Q, D_itc)."""
        query_output = self.qformer_pass(image_embeds, None, None, "itc").query_output
        return nn.functional.normalize(self.vision_projection(query_output), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised ITC feature of each text's ``[CLS]``, (B, T) -> (B, D_itc)."""
        text_output = self.text_pass(input_ids, attention_mask)
        return nn.functional.normalize(self.text_projection(text_output[:, 0]), dim=-1)

    @staticmethod
    def itc_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity, max over queries: (B_i, Q, D) x (B_t, D) -> (B_i, B_t)."""
        return torch.einsum("iqd,td->itq", image_features, text_features).max(dim=-1).values

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """2-way match logits of aligned (image, text) pairs, averaged over queries: (B, 2)."""
        query_output = self.qformer_pass(image_embeds, input_ids, attention_mask, "itm").query_output
        return self.itm_head(query_output).mean(dim=1)

    def itg_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-grounded LM logits (B, T, V) and the ``[DEC]``-led ids they predict (B, T)."""
        if self.itg_head is None:
            raise RuntimeError("this stage-1 model has no ITG head (loaded from a retrieval checkpoint without "
                               "one): it scores (ITC, ITM) but cannot be trained or generate with ITG")
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.dec_token_id  # ITG starts with [DEC] where ITC/ITM start with [CLS]
        text_output = self.qformer_pass(image_embeds, decoder_ids, attention_mask, "itg").text_output
        return self.itg_head(text_output), decoder_ids

    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(*TEMPERATURE_RANGE)

"""Stage 2: the Q-Former's queries, projected into a frozen LLM.

transformers ships the model, ``Blip2ForConditionalGeneration`` (``vision_model``, ``query_tokens``,
``qformer``, ``language_projection``, ``language_model``; ``forward`` with ``labels``; ``generate``), and
this module uses it as is. It adds what transformers lacks:

- builders with every hyperparameter in the signature, loading the frozen backbones with
  ``from_pretrained(path)`` and starting the Q-Former from stage 1 (:func:`load_stage1_qformer`);
- :class:`Blip2Stage2`, the training view that keeps the backbones frozen *and* in eval mode through
  ``model.train()``, with mixed precision on GPU (:func:`cast_backbones`);
- tokenized training batches (:func:`build_stage2_batch`), laid out exactly as ``Blip2Processor`` lays out
  its inputs: ``<image>*N`` first, then the left-padded text;
- and, in ``blip2.models.export``, checkpoints of the trainable parameters only.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

TOY_NUM_QUERY_TOKENS = 8
# A stage-1 Q-Former layer's text-only feed-forward ("intermediate." / "output.", beside the queries'
# "intermediate_query." / "output_query."). Stage 2 never feeds text to the Q-Former, so it has none.
_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


# ---------------------------------------------------------------------------------------------------
# Configs and builders.


def build_blip2_config(vision_config: Blip2VisionConfig, qformer_config: Blip2QFormerConfig,
                       text_config: PretrainedConfig, num_query_tokens: int, image_token_index: int) -> Blip2Config:
    """A ``Blip2Config`` from its three parts. Shared sizes are derived, not repeated: ``Blip2Config``
    sets the Q-Former's ``encoder_hidden_size`` from the vision config (on a copy: the caller's config is
    left alone), and ``language_projection`` maps the Q-Former's width to the LLM's."""
    if num_query_tokens < 1:
        raise ValueError(f"num_query_tokens must be >= 1, got {num_query_tokens}")
    if not 0 <= image_token_index < text_config.vocab_size:
        raise ValueError(f"image_token_index {image_token_index} is outside the LLM's vocabulary "
                         f"({text_config.vocab_size} tokens)")
    return Blip2Config(vision_config=copy.deepcopy(vision_config), qformer_config=copy.deepcopy(qformer_config),
                       text_config=copy.deepcopy(text_config), num_query_tokens=num_query_tokens,
                       image_token_index=image_token_index)


def load_language_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The frozen LLM at ``path``: ``AutoModelForSeq2SeqLM`` when its config is encoder-decoder (Flan-T5),
    ``AutoModelForCausalLM`` otherwise (OPT, Vicuna)."""
    config = AutoConfig.from_pretrained(path)
    loader = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return loader.from_pretrained(path, dtype=dtype)


def build_stage2_model(vision_path: str | Path, llm_path: str | Path, qformer_config: Blip2QFormerConfig,
                       num_query_tokens: int, image_token_index: int,
                       stage1_state_dict: dict[str, Tensor] | None = None, query_tokens_init_std: float = 0.02,
                       projection_init_std: float = 0.02, marker_bias: bool = True,
                       dtype: torch.dtype = torch.float32) -> Blip2ForConditionalGeneration:
    """A stage-2 ``Blip2ForConditionalGeneration``: frozen backbones loaded with ``from_pretrained``, a
    Q-Former from ``stage1_state_dict`` (or freshly initialised), and a new ``language_projection``.

    The Q-Former's architecture always comes from ``qformer_config`` (a checkpoint holds weights, not
    hyperparameters); ``stage1_state_dict`` must match it. The backbones load in ``dtype``; the
    trainable parts are fp32 (see :func:`cast_backbones` for GPU precision). The model is returned with
    every parameter trainable: wrap it in :class:`Blip2Stage2` to train it.

    - ``query_tokens_init_std``: transformers zero-initialises ``query_tokens``; identical queries get
      identical outputs and gradients (the Q-Former has no query positions), so they would never
      diverge. A random start, as the paper's code draws, breaks that symmetry.
    - ``marker_bias``: the toy LLMs were pretrained with the ``<image>`` token's embedding added to every
      context-word embedding, exactly where the projected queries now go (``context_marker_token_id`` in
      their config). Starting ``language_projection.bias`` at that embedding (and the weight small)
      makes the queries look like context to the frozen LLM from step 0. (Measured on toy captions, one
      seed, 200 steps: no faster drop of the loss than a zero bias, and no worse by the end; it is kept
      because it is the input the LLM was pretrained on.) An LLM without the marker gets a zero bias.
    """
    vision_model = Blip2VisionModel.from_pretrained(vision_path, dtype=dtype)
    language_model = load_language_model(llm_path, dtype=dtype)
    config = build_blip2_config(vision_model.config, qformer_config, language_model.config, num_query_tokens,
                                image_token_index)
    # Built on the meta device, then given real parts: the random backbones transformers would
    # otherwise allocate (billions of parameters for a real LLM) are never materialised.
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    model.vision_model = vision_model
    model.language_model = language_model
    model.qformer = Blip2QFormerModel(config.qformer_config)
    model.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, qformer_config.hidden_size)
                                      * query_tokens_init_std)
    model.language_projection = nn.Linear(qformer_config.hidden_size, config.text_config.hidden_size)
    with torch.no_grad():
        nn.init.normal_(model.language_projection.weight, std=projection_init_std)
        marker = getattr(config.text_config, "context_marker_token_id", None)
        if marker_bias and marker is not None:
            model.language_projection.bias.copy_(language_model.get_input_embeddings().weight[marker].float())
        else:
            nn.init.zeros_(model.language_projection.bias)
    check_materialised(model)
    if stage1_state_dict is not None:
        load_stage1_qformer(model, stage1_state_dict)
    return model


def check_materialised(model: nn.Module) -> None:
    """Raise if a model assembled on the meta device still holds a meta tensor (one no part replaced)."""
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"parameters left on the meta device: {left[:5]}")


def load_stage1_qformer(model: nn.Module, state_dict: dict[str, Tensor]) -> list[str]:
    """Copy ``query_tokens`` and ``qformer.*`` from a stage-1 state dict (``Blip2ForImageTextRetrieval``
    names) into a stage-2 model; returns the stage-1 keys left behind, sorted.

    Left behind on purpose: the text-only FFN of each Q-Former layer and the text ``embeddings`` (stage 2
    feeds the Q-Former no text; InstructBLIP takes them back, see ``blip2.models.instruct``), and the
    stage-1 heads (ITC projections, ITM, ITG, temperature) and ``vision_model`` (the frozen encoder is
    already loaded). Every ``query_tokens`` / ``qformer`` tensor of ``model`` must be present and match.
    """
    model = unwrap(model)
    targets = {n: t for n, t in model.state_dict().items() if n == "query_tokens" or n.startswith("qformer.")}
    missing = sorted(set(targets) - set(state_dict))
    if missing:
        raise KeyError(f"the stage-1 state dict lacks {len(missing)} Q-Former tensors, e.g. {missing[:3]}")
    for name, target in targets.items():
        if state_dict[name].shape != target.shape:
            raise ValueError(f"{name}: stage-1 shape {tuple(state_dict[name].shape)} != model {tuple(target.shape)}")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(state_dict[name])
    unexpected = [n for n in state_dict if n.startswith("qformer.") and n not in targets and not _TEXT_FFN.match(n)]
    if unexpected:
        raise KeyError(f"stage-1 Q-Former tensors with no place in stage 2: {unexpected[:3]}")
    return sorted(set(state_dict) - set(targets))


# ---------------------------------------------------------------------------------------------------
# Freezing and precision.


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a :class:`Blip2Stage2`, or ``model`` itself."""
    return model.model if isinstance(model, Blip2Stage2) else model


@dataclass
class Stage2Output:
    lm_loss: Tensor  # scalar, mean over target tokens
    logits: Tensor  # (B, T, V): every LLM position (decoder-only) or the decoder's (encoder-decoder)


class Blip2Stage2(nn.Module):
    """Training view of a ``Blip2ForConditionalGeneration`` or ``InstructBlipForConditionalGeneration``:
    the image encoder and the LLM are frozen, and stay frozen.

    Frozen means no gradients *and* eval mode: a real LLM has dropout (OPT: 0.1) that must not fire
    while its weights are fixed. ``nn.Module.train()`` recurses into every child, so a frozen child
    set to eval once does not stay there; this wrapper's ``train()`` puts the backbones back at once.
    It is a wrapper rather than a forward pre-hook on the backbones because ``.training`` is then right
    the moment ``train()`` returns (not only after the next forward), nothing runs per forward call
    (generation calls the LLM once per token), and the transformers model stays an unmodified
    transformers model that ``save_pretrained`` / ``generate`` / export use directly (``.model``).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.freeze_backbones()

    def frozen_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.model.vision_model, self.model.language_model

    def freeze_backbones(self) -> None:
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> Blip2Stage2:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``query_tokens``, ``qformer.*``, ``language_projection.*``, named as in the transformers model."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                qformer_input_ids: Tensor | None = None, qformer_attention_mask: Tensor | None = None,
                ) -> Stage2Output:
        """pixel_values (B, 3, H, W); input_ids / attention_mask (B, N + T) with ``<image>`` ids on the
        N query positions; labels (B, N + T) decoder-only or (B, L) encoder-decoder, -100 where no loss.
        ``qformer_input_ids`` / ``qformer_attention_mask`` (B, S): the instruction, InstructBLIP only."""
        qformer_inputs = {}
        if qformer_input_ids is not None:
            qformer_inputs = {"qformer_input_ids": qformer_input_ids, "qformer_attention_mask": qformer_attention_mask}
        vision_dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        output = self.model(pixel_values=pixel_values.to(vision_dtype), input_ids=input_ids,
                            attention_mask=attention_mask, labels=labels, **qformer_inputs)
        return Stage2Output(lm_loss=output.loss, logits=output.logits)


def _upcast_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def cast_backbones(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen backbones (image encoder, and LLM if there is one) to ``dtype`` (fp16/bf16 on GPU; keep fp32 on CPU, where half precision is ~100x
    slower). The trainable parts (``query_tokens``, ``qformer``, ``language_projection``) stay fp32, as
    transformers' ``_keep_in_fp32_modules`` keeps the Q-Former, and so does the image encoder's output
    layernorm, which also gets its input upcast, so the Q-Former cross-attends to fp32 features (the
    paper's code keeps this ``ln_vision`` in fp32 for the same reason: a half-precision layernorm over
    a frozen ViT's outputs loses precision the Q-Former would learn from)."""
    model = unwrap(model)
    model.vision_model.to(dtype)
    if hasattr(model, "language_model"):  # stage 1 has none
        model.language_model.to(dtype)
    for part in (model.qformer, getattr(model, "language_projection", None)):
        if part is not None:
            part.float()
    model.query_tokens.data = model.query_tokens.data.float()
    layernorm = model.vision_model.post_layernorm
    layernorm.float()
    if dtype != torch.float32 and not getattr(layernorm, "_blip2_upcast_hook", False):
        layernorm.register_forward_pre_hook(_upcast_inputs)
        layernorm._blip2_upcast_hook = True


def backbone_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that have it, else fp16 on GPU; fp32 on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------------------------------
# Batches: tokenization happens here, never in forward.


@dataclass(frozen=True)
class Blip2Batch:
    """One tokenized stage-2 / instruction-tuning batch.

    ``input_ids`` (B, N + T): ``<image>`` * N (replaced by the projected queries), then the text,
    left-padded: decoder-only ``<s> prompt target </s>``, encoder-decoder ``<s> prompt`` (the encoder's
    input). ``labels``: (B, N + T) for decoder-only, -100 on the image tokens, padding and ``<s> prompt``;
    (B, L) for encoder-decoder, ``target </s>`` right-padded with -100 (T5 shifts it behind its start
    token itself). ``qformer_*`` (B, S): the instruction for InstructBLIP's Q-Former, else None.
    """

    pixel_values: Tensor  # (B, 3, H, W)
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    qformer_input_ids: Tensor | None = None
    qformer_attention_mask: Tensor | None = None

    def to(self, device: torch.device | str) -> Blip2Batch:
        return Blip2Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                             for f in fields(self)})

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for :class:`Blip2Stage2` (and the transformers model's ``forward``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def encode_with_left_truncation(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                                max_length: int | None) -> list[list[int]]:
    """``tokenizer``'s ids of each text with its own special tokens (``<s> text`` here, ``[CLS] text
    [SEP]`` for BERT, ``text </s>`` for T5), cut to ``max_length`` by dropping the *earliest* non-special
    tokens: the end of an instruction, where the question usually is, survives."""
    encoded = tokenizer(list(texts), return_special_tokens_mask=True)
    result = []
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True):
        excess = len(ids) - max_length if max_length is not None else 0
        if excess > sum(1 for s in special if not s):
            raise ValueError(f"max_length {max_length} cannot hold the {sum(special)} special tokens")
        kept = []
        for token, is_special in zip(ids, special, strict=True):
            if excess > 0 and not is_special:
                excess -= 1
                continue
            kept.append(token)
        result.append(kept)
    return result


def encode_targets(tokenizer: PreTrainedTokenizerBase, targets: Sequence[str],
                   max_length: int | None) -> list[list[int]]:
    """``target </s>`` ids, cut from the right to ``max_length`` (a cut target loses its ``</s>``: the
    model must not learn to stop where the text did not)."""
    ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    return [(t + [tokenizer.eos_token_id])[:max_length] for t in ids]


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, side: str) -> Tensor:
    """(B, max length) long tensor; ``side`` is "left" or "right"."""
    width = max(len(s) for s in sequences)
    if side == "left":
        rows = [[value] * (width - len(s)) + list(s) for s in sequences]
    elif side == "right":
        rows = [list(s) + [value] * (width - len(s)) for s in sequences]
    else:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return torch.tensor(rows, dtype=torch.long)


def with_image_tokens(texts: Sequence[Sequence[int]], pad_token_id: int, num_query_tokens: int,
                      image_token_index: int) -> tuple[Tensor, Tensor]:
    """``<image>`` * N, then the texts left-padded: ``input_ids`` and ``attention_mask``, (B, N + T). The
    layout ``Blip2Processor`` / ``InstructBlipProcessor`` produce, so both give the LLM identical inputs."""
    text_ids = pad_sequences(texts, pad_token_id, "left")
    text_mask = pad_sequences([[1] * len(t) for t in texts], 0, "left")
    batch = len(texts)
    image_ids = torch.full((batch, num_query_tokens), image_token_index, dtype=torch.long)
    return torch.cat([image_ids, text_ids], 1), torch.cat([torch.ones_like(image_ids), text_mask], 1)


def build_stage2_batch(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, pixel_values: Tensor,
                       targets: Sequence[str], prompts: Sequence[str] | None = None,
                       max_text_length: int | None = None, max_target_length: int | None = None) -> Blip2Batch:
    """Tokenize a stage-2 batch for the model with ``config`` (a ``Blip2Config`` or ``InstructBlipConfig``:
    it gives ``num_query_tokens``, ``image_token_index`` and which kind of LLM).

    Decoder-only: ``<image>*N <s> prompt target </s>``, loss on ``target </s>`` only. Encoder-decoder:
    encoder ``<image>*N <s> prompt``, decoder ``target </s>``. ``prompts`` default to empty (captioning);
    ``max_text_length`` bounds ``<s> prompt`` (cut from the left), ``max_target_length`` bounds
    ``target </s>`` (cut from the right). pixel_values (B, 3, H, W) pass through.
    """
    if prompts is None:
        prompts = [""] * len(targets)
    if not len(prompts) == len(targets) == pixel_values.shape[0]:
        raise ValueError(f"{pixel_values.shape[0]} images, {len(prompts)} prompts, {len(targets)} targets")
    prompt_ids = encode_with_left_truncation(tokenizer, prompts, max_text_length)
    target_ids = encode_targets(tokenizer, targets, max_target_length)
    pad = tokenizer.pad_token_id
    n = config.num_query_tokens
    if config.use_decoder_only_language_model:
        texts = [p + t for p, t in zip(prompt_ids, target_ids, strict=True)]
        input_ids, attention_mask = with_image_tokens(texts, pad, n, config.image_token_index)
        text_labels = [[-100] * len(p) + t for p, t in zip(prompt_ids, target_ids, strict=True)]
        labels = torch.cat([torch.full((len(texts), n), -100), pad_sequences(text_labels, -100, "left")], 1)
    else:
        input_ids, attention_mask = with_image_tokens(prompt_ids, pad, n, config.image_token_index)
        labels = pad_sequences(target_ids, -100, "right")
    return Blip2Batch(pixel_values, input_ids, attention_mask, labels)


def split_prefix(captions: Sequence[str], rng: np.random.Generator,
                 max_prefix_fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """The paper's prefix language modelling for encoder-decoder LLMs: each caption is cut at a random
    word boundary; the prefix joins the queries in the encoder (use it as the prompt), the suffix is the
    decoder's target. The prefix takes at most ``max_prefix_fraction`` of the words (possibly none), and
    the suffix is empty only for an empty caption."""
    if not 0.0 <= max_prefix_fraction < 1.0:
        raise ValueError(f"max_prefix_fraction must be in [0, 1), got {max_prefix_fraction}")
    prefixes, suffixes = [], []
    for caption in captions:
        words = caption.split()
        cut = int(rng.integers(0, int(len(words) * max_prefix_fraction) + 1)) if words else 0
        prefixes.append(" ".join(words[:cut]))
        suffixes.append(" ".join(words[cut:]))
    return prefixes, suffixes

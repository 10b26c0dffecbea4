"""InstructBLIP: the instruction enters the Q-Former beside the queries, and the LLM reads it too.

transformers' ``InstructBlipForConditionalGeneration`` is the model: its ``InstructBlipQFormerModel``
embeds ``[queries; instruction]`` and runs them through one bidirectional self-attention (queries and
instruction see each other; only the queries cross-attend to the image), and only the query outputs are
projected into the LLM, whose input is ``<image>*N <s> instruction``. This module adds the builder that
starts it from a stage-2 BLIP-2 model (and the stage-1 text weights), and its batches.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
    InstructBlipVisionConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from blip2.models.stage2 import (
    Blip2Batch,
    check_materialised,
    build_stage2_batch,
    encode_with_left_truncation,
    pad_sequences,
    unwrap,
)

# Fields that Blip2QFormerConfig / Blip2VisionConfig share with their InstructBLIP counterparts.
_QFORMER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                   "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                   "initializer_range", "layer_norm_eps", "cross_attention_frequency", "encoder_hidden_size")
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range", "qkv_bias")
# Stage-1 (Blip2ForImageTextRetrieval) names of the Q-Former's text-side weights -> InstructBLIP names.
_STAGE1_TEXT_EMBEDDINGS = {"embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
                           "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight"}
# A Q-Former layer's text-only feed-forward, beside the queries' "intermediate_query." / "output_query.".
_TEXT_FFN = re.compile(r"^encoder\.layer\.\d+\.(intermediate|output)\.")


def build_instruct_config(vision_config: PretrainedConfig, qformer_config: PretrainedConfig,
                          text_config: PretrainedConfig, num_query_tokens: int, image_token_index: int,
                          qformer_vocab_size: int, qformer_pad_token_id: int,
                          qformer_max_position_embeddings: int | None = None) -> InstructBlipConfig:
    """An ``InstructBlipConfig`` with the sizes of a BLIP-2 model's parts (``Blip2VisionConfig``,
    ``Blip2QFormerConfig``), the Q-Former's vocabulary being ``len(qformer_tokenizer)``."""
    qformer = {name: getattr(qformer_config, name) for name in _QFORMER_FIELDS}
    if qformer_max_position_embeddings is not None:
        qformer["max_position_embeddings"] = qformer_max_position_embeddings
    return InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**{name: getattr(vision_config, name) for name in _VISION_FIELDS}),
        qformer_config=InstructBlipQFormerConfig(**qformer, vocab_size=qformer_vocab_size,
                                                 pad_token_id=qformer_pad_token_id),
        text_config=copy.deepcopy(text_config), num_query_tokens=num_query_tokens,
        image_token_index=image_token_index,
    )


def _qformer_weights(stage2: Blip2ForConditionalGeneration, stage1_state_dict: dict[str, Tensor] | None,
                     qformer: InstructBlipQFormerModel) -> dict[str, Tensor]:
    """The InstructBLIP Q-Former's state dict (names relative to ``qformer.``) from stage 2 (+ stage 1).

    Stage 2's Q-Former gives the attention, cross-attention and query FFN of every layer, and its input
    layernorm (``qformer.layernorm`` in BLIP-2, ``qformer.embeddings.layernorm`` in InstructBLIP). The
    instruction needs what stage 2 dropped: the text FFN and the word / position embeddings, taken from
    stage 1 when given. Without stage 1, the text FFN starts as a copy of the query FFN (the paper's
    code initialised the query FFN from BERT's text FFN the same way, in the other direction) and the
    embeddings keep their fresh N(0, 0.02) initialisation.
    """
    weights = dict(qformer.state_dict())
    stage2_weights = stage2.qformer.state_dict()
    for name, tensor in stage2_weights.items():
        weights["embeddings." + name if name.startswith("layernorm.") else name] = tensor
    for name in weights:
        if not _TEXT_FFN.match(name):
            continue
        if stage1_state_dict is not None and "qformer." + name in stage1_state_dict:
            weights[name] = stage1_state_dict["qformer." + name]
        elif name not in stage2_weights:
            weights[name] = weights[_TEXT_FFN.sub(lambda m: f"{m.group(0)[:-1]}_query.", name)]
    if stage1_state_dict is not None:
        for source, target in _STAGE1_TEXT_EMBEDDINGS.items():
            if source not in stage1_state_dict:
                raise KeyError(f"the stage-1 state dict lacks {source}")
            weights[target] = stage1_state_dict[source]
    return weights


def build_instruct_model(stage2_model: nn.Module, qformer_tokenizer: PreTrainedTokenizerBase,
                         stage1_state_dict: dict[str, Tensor] | None = None) -> InstructBlipForConditionalGeneration:
    """An ``InstructBlipForConditionalGeneration`` started from a stage-2 BLIP-2 model: same image
    encoder, queries, projection and LLM; the Q-Former also reads the instruction
    (``qformer_tokenizer``'s vocabulary), its text weights from ``stage1_state_dict`` when given (see
    :func:`_qformer_weights`).

    The frozen image encoder and LLM *share* their tensors with ``stage2_model`` (nothing is copied; they
    never change); ``query_tokens``, ``qformer`` and ``language_projection`` are fresh copies, fp32.
    """
    stage2 = unwrap(stage2_model)
    positions = None
    if stage1_state_dict is not None and "embeddings.position_embeddings.weight" in stage1_state_dict:
        positions = stage1_state_dict["embeddings.position_embeddings.weight"].shape[0]
    config = build_instruct_config(stage2.config.vision_config, stage2.config.qformer_config,
                                   stage2.config.text_config, stage2.config.num_query_tokens,
                                   stage2.config.image_token_index, len(qformer_tokenizer),
                                   qformer_tokenizer.pad_token_id, positions)
    with torch.device("meta"):  # as in build_stage2_model: no random backbones are ever allocated
        model = InstructBlipForConditionalGeneration(config)
    # Same architecture and parameter names as Blip2VisionModel: the stage-2 tensors are assigned as is.
    model.vision_model.load_state_dict(stage2.vision_model.state_dict(), assign=True)
    model.language_model = stage2.language_model
    model.qformer = InstructBlipQFormerModel(config.qformer_config)
    model.qformer.load_state_dict(
        {n: t.detach().clone().float() for n, t in _qformer_weights(stage2, stage1_state_dict, model.qformer).items()})
    model.query_tokens = nn.Parameter(stage2.query_tokens.detach().clone().float())
    model.language_projection = copy.deepcopy(stage2.language_projection).float()
    check_materialised(model)
    return model


def instruction_aware(config: Any) -> bool:
    """Whether an InstructBLIP model's Q-Former reads the instruction (InstructBLIP's instruction-aware
    visual features; the default). A model tuned with ``qformer_instruction=false`` (the ablation of
    InstructBLIP's Table 3) says so in its config (``qformer_instruction: false`` in ``config.json``, an
    attribute transformers keeps); its Q-Former is given an empty instruction, in training and after."""
    return bool(getattr(config, "qformer_instruction", True))


def encode_qformer_instructions(qformer_tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str],
                                max_length: int | None, aware: bool = True) -> tuple[Tensor, Tensor]:
    """``[CLS] instruction [SEP]`` for InstructBLIP's Q-Former, cut from the left to ``max_length`` and
    right-padded: ``qformer_input_ids``, ``qformer_attention_mask``, (B, S). ``aware=False`` (a model for
    which :func:`instruction_aware` is false): ``[CLS] [SEP]`` for every instruction.

    Right-padded whatever the LLM tokenizer's side: the Q-Former numbers text positions from 0 whatever
    the mask says, so left padding would shift an instruction's positions by its batch-mates' lengths.
    (transformers' ``InstructBlipProcessor`` pads the Q-Former text on the *LLM* tokenizer's side.)"""
    ids = encode_with_left_truncation(qformer_tokenizer, instructions if aware else [""] * len(instructions),
                                      max_length)
    mask = pad_sequences([[1] * len(s) for s in ids], 0, "right")
    return pad_sequences(ids, qformer_tokenizer.pad_token_id, "right"), mask


def build_instruct_batch(tokenizer: PreTrainedTokenizerBase, qformer_tokenizer: PreTrainedTokenizerBase,
                         config: InstructBlipConfig, pixel_values: Tensor, instructions: Sequence[str],
                         targets: Sequence[str], max_qformer_length: int = 128, max_text_length: int = 128,
                         max_target_length: int = 256) -> Blip2Batch:
    """An instruction-tuning batch: the LLM part as :func:`blip2.models.stage2.build_stage2_batch` with the
    instruction as prompt, plus the instruction for the Q-Former. Instructions are cut from the *left*
    (``max_qformer_length`` Q-Former tokens, ``max_text_length`` LLM tokens, special tokens included) so
    the question at their end survives; targets from the right (``max_target_length`` with ``</s>``).
    The defaults are the paper's code's (128 / 128 / 256)."""
    batch = build_stage2_batch(tokenizer, config, pixel_values, targets, instructions, max_text_length,
                               max_target_length)
    qformer_input_ids, qformer_attention_mask = encode_qformer_instructions(qformer_tokenizer, instructions,
                                                                            max_qformer_length,
                                                                            instruction_aware(config))
    return Blip2Batch(batch.pixel_values, batch.input_ids, batch.attention_mask, batch.labels,
                      qformer_input_ids, qformer_attention_mask)

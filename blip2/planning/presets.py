"""The papers' models at their real sizes, as transformers configs, built on the meta device.

Nothing is downloaded and no weight is allocated: every hyperparameter of the published checkpoints is
written out below, in transformers' own config classes, and a model built from them ``with
torch.device("meta")`` has the published parameter count (checked in tests, within 3%). These are what
``pipelines/configs/*_gpu.yaml`` load from real checkpoint directories; here they only say how big
things are, for :mod:`blip2.planning.plan`.

Sources: EVA-CLIP ViT-g/14 (Fang et al., 2022) and CLIP ViT-L/14 (Radford et al., 2021), each with its
last layer removed as BLIP-2 does (§3.3 of Li et al., 2023); the Q-Former is BERT-base with
cross-attention every other layer and 32 queries (BLIP-2 §3.1: 188M parameters); OPT (Zhang et al.,
2022), Flan-T5 (Chung et al., 2022) and Vicuna-7B (LLaMA-7B's architecture) as published.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    Blip2VisionModel,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    T5Config,
)

from blip2.models.instruct import build_instruct_config
from blip2.models.qformer import Blip2QFormerForPretraining
from blip2.models.stage2 import build_blip2_config

NUM_QUERY_TOKENS = 32
BERT_BASE_VOCAB = 30522  # bert-base-uncased; the Q-Former's tokenizer adds [DEC] (stage 1, InstructBLIP)


def vision_config(name: str) -> Blip2VisionConfig:
    """The frozen image encoder, ``"vit-g"`` or ``"vit-l"``, as BLIP-2 uses it: the last layer is
    dropped (the second-to-last layer's output is what the Q-Former reads)."""
    if name == "vit-g":  # EVA-CLIP ViT-g/14: 40 layers, 1408 wide, MLP 6144, 16 heads
        return Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=40 - 1,
                                 num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu",
                                 layer_norm_eps=1e-6, qkv_bias=True)
    if name == "vit-l":  # CLIP ViT-L/14: 24 layers, 1024 wide, MLP 4096, 16 heads
        return Blip2VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24 - 1,
                                 num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu",
                                 layer_norm_eps=1e-5, qkv_bias=True)
    raise KeyError(f"unknown image encoder {name!r}; expected one of {VISION_ENCODERS}")


VISION_ENCODERS = ("vit-g", "vit-l")


def qformer_config(vision_hidden_size: int, *, text_input: bool) -> Blip2QFormerConfig:
    """BERT-base with cross-attention to the image every 2nd layer. ``text_input``: the text branch
    (embeddings and a text feed-forward per layer), which stage 1 and InstructBLIP have and stage 2
    does not (see :func:`blip2.models.qformer.build_qformer_config`)."""
    return Blip2QFormerConfig(vocab_size=BERT_BASE_VOCAB + 1, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                              max_position_embeddings=512, layer_norm_eps=1e-12, cross_attention_frequency=2,
                              encoder_hidden_size=vision_hidden_size, use_qformer_text_input=text_input)


def _opt(hidden: int, layers: int, heads: int, ffn: int) -> OPTConfig:
    # 50272 rows: OPT's 50265 BPE tokens padded to a multiple of 8; BLIP-2's <image> is token 50265.
    return OPTConfig(vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=ffn, max_position_embeddings=2048, word_embed_proj_dim=hidden,
                     do_layer_norm_before=True, enable_bias=True, tie_word_embeddings=True,
                     pad_token_id=1, bos_token_id=2, eos_token_id=2)


def _flan_t5(d_model: int, d_ff: int, heads: int) -> T5Config:
    # 32128 rows: T5's 32100 sentencepiece tokens (incl. 100 sentinels) padded; <image> is token 32100.
    return T5Config(vocab_size=32128, d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=24, num_decoder_layers=24,
                    num_heads=heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-6,
                    dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, bos_token_id=0)


def _vicuna_7b() -> LlamaConfig:
    # 32000 LLaMA tokens + the pad token LAVIS adds + the <image> token transformers' processor adds.
    return LlamaConfig(vocab_size=32002, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                       max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       pad_token_id=32000, bos_token_id=1, eos_token_id=2)


def llm_config(name: str) -> PretrainedConfig:
    """The frozen LLM ``name`` (see :data:`LLMS`)."""
    builders = {"opt-2.7b": lambda: _opt(2560, 32, 32, 10240), "opt-6.7b": lambda: _opt(4096, 32, 32, 16384),
                "flan-t5-xl": lambda: _flan_t5(2048, 5120, 32), "flan-t5-xxl": lambda: _flan_t5(4096, 10240, 64),
                "vicuna-7b": _vicuna_7b}
    if name not in builders:
        raise KeyError(f"unknown LLM {name!r}; expected one of {LLMS}")
    return builders[name]()


LLMS = ("opt-2.7b", "opt-6.7b", "flan-t5-xl", "flan-t5-xxl", "vicuna-7b")
IMAGE_TOKEN_INDEX = {"opt": 50265, "t5": 32100, "llama": 32001}


@dataclass(frozen=True)
class RealPreset:
    """A published model: its parts and its parameter count as published (rounded)."""

    name: str
    vision: str
    llm: str
    instruct: bool
    published_params: float

    @property
    def encoder_decoder(self) -> bool:
        return self.llm.startswith("flan-t5")


PRESETS: dict[str, RealPreset] = {p.name: p for p in (
    RealPreset("blip2-opt-2.7b", "vit-g", "opt-2.7b", False, 3.74e9),
    RealPreset("blip2-opt-6.7b", "vit-g", "opt-6.7b", False, 7.75e9),
    RealPreset("blip2-flan-t5-xl", "vit-g", "flan-t5-xl", False, 3.94e9),
    RealPreset("blip2-flan-t5-xxl", "vit-g", "flan-t5-xxl", False, 12.2e9),
    RealPreset("instructblip-vicuna-7b", "vit-g", "vicuna-7b", True, 7.91e9),
    RealPreset("instructblip-flan-t5-xl", "vit-g", "flan-t5-xl", True, 4.02e9),
)}
QFORMER_PUBLISHED_PARAMS = 188e6  # BLIP-2 §3.1, the stage-1 Q-Former with its text branch and queries


def preset(name: str) -> RealPreset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def model_config(p: RealPreset) -> Blip2Config | PretrainedConfig:
    """The ``Blip2Config`` (or ``InstructBlipConfig``) of preset ``p``."""
    vision = vision_config(p.vision)
    text = llm_config(p.llm)
    image_token = IMAGE_TOKEN_INDEX[text.model_type]
    if p.instruct:
        return build_instruct_config(vision, qformer_config(vision.hidden_size, text_input=True), text,
                                     NUM_QUERY_TOKENS, image_token, BERT_BASE_VOCAB + 1, 0)
    return build_blip2_config(vision, qformer_config(vision.hidden_size, text_input=False), text,
                              NUM_QUERY_TOKENS, image_token)


def build_meta_model(p: RealPreset) -> nn.Module:
    """``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration`` of preset ``p`` on the
    meta device: every parameter has its shape and dtype (fp32), none has storage."""
    config = model_config(p)
    with torch.device("meta"):
        return (InstructBlipForConditionalGeneration if p.instruct else Blip2ForConditionalGeneration)(config)


def build_meta_stage1(vision: str, dec_token_id: int = BERT_BASE_VOCAB) -> Blip2QFormerForPretraining:
    """The stage-1 model (frozen ``vision`` encoder + Q-Former with its ITC/ITM/ITG heads) on the meta
    device; ``dec_token_id`` is the ``[DEC]`` token the Q-Former's tokenizer adds after BERT's vocabulary."""
    vision_cfg = vision_config(vision)
    config = Blip2Config(vision_config=vision_cfg.to_dict(),
                         qformer_config=qformer_config(vision_cfg.hidden_size, text_input=True).to_dict(),
                         num_query_tokens=NUM_QUERY_TOKENS, image_text_hidden_size=256)
    with torch.device("meta"):
        return Blip2QFormerForPretraining(config, Blip2VisionModel(config.vision_config), dec_token_id)


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (tied weights, e.g. OPT's input and output embeddings, count once)."""
    return sum(p.numel() for p in module.parameters())


def qformer_parameters(stage1: Blip2QFormerForPretraining) -> int:
    """The Q-Former as the paper counts it: everything but the frozen image encoder."""
    return count_parameters(stage1) - count_parameters(stage1.vision_model)

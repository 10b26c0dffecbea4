"""Named models: the toy presets, built from the packaged frozen backbones, and Salesforce's published
checkpoints, loaded with :func:`blip2.models.export.import_pretrained` (``from_pretrained`` of a hub id).

A toy model exported with :mod:`blip2.models.export` loads through that same ``import_pretrained``, so
CapFilt and Serve treat a toy checkpoint and ``Salesforce/blip2-opt-2.7b`` alike. Nothing here downloads
anything unless a published preset is asked for.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from blip2.backbones.build import find_backbones
from blip2.models.export import ModelBundle, import_pretrained
from blip2.models.instruct import build_instruct_model
from blip2.models.qformer import build_qformer_config
from blip2.models.stage2 import TOY_NUM_QUERY_TOKENS, build_stage2_model
from blip2.tokenization import IMAGE_TOKEN

# Published transformers checkpoints (hub ids, or local copies of them passed to import_pretrained).
PUBLISHED: dict[str, str] = {
    "blip2-opt-2.7b": "Salesforce/blip2-opt-2.7b",
    "blip2-flan-t5-xl": "Salesforce/blip2-flan-t5-xl",
    "instructblip-flan-t5-xl": "Salesforce/instructblip-flan-t5-xl",
    "instructblip-vicuna-7b": "Salesforce/instructblip-vicuna-7b",
}


@dataclass(frozen=True)
class ToyPreset:
    """A model built from the toy backbones: ``llm`` is ``"opt"`` (decoder-only) or ``"t5"``
    (encoder-decoder); ``instruct`` builds InstructBLIP on top of the stage-2 model.

    ``llm_config`` (pairs of config field and value) replaces the packaged LLM by an *untrained* one of
    the same family with those sizes (same tokenizer, same loading code): a model whose forward costs
    more, for measuring serving where model compute outweighs the HTTP path. Its text is junk."""

    llm: str
    instruct: bool = False
    num_query_tokens: int = TOY_NUM_QUERY_TOKENS
    llm_config: tuple[tuple[str, int], ...] = ()


# About 28x the toy OPT's FLOPs per token (4 layers of width 512 instead of 2 of 128).
LARGE_OPT = (("hidden_size", 512), ("word_embed_proj_dim", 512), ("ffn_dim", 2048), ("num_hidden_layers", 4))

TOY: dict[str, ToyPreset] = {
    "toy-opt": ToyPreset("opt"),
    "toy-t5": ToyPreset("t5"),
    "toy-instruct-opt": ToyPreset("opt", instruct=True),
    "toy-instruct-t5": ToyPreset("t5", instruct=True),
    "toy-instruct-opt-large": ToyPreset("opt", instruct=True, llm_config=LARGE_OPT),
}


def preset_names() -> list[str]:
    return [*TOY, *PUBLISHED]


def build_toy(preset: ToyPreset, backbones_root: str | Path | None = None, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> ModelBundle:
    """A freshly initialised toy model (random Q-Former, seeded) over the packaged frozen backbones
    (loaded in ``dtype``)."""
    backbones = find_backbones(backbones_root)
    llm_path = {"opt": backbones.opt, "t5": backbones.t5}[preset.llm]
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    qformer_tokenizer = AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)
    image_processor = AutoImageProcessor.from_pretrained(backbones.vision)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        if preset.llm_config:
            llm_path = _untrained_llm(llm_path, dict(preset.llm_config), Path(scratch))
        return _build_toy(preset, backbones.vision, llm_path, tokenizer, qformer_tokenizer, image_processor, dtype)


def _untrained_llm(path: Path, sizes: dict[str, int], out: Path) -> Path:
    """A randomly initialised LLM of ``path``'s family with ``sizes``, saved under ``out``."""
    config = AutoConfig.from_pretrained(path)
    for name, value in sizes.items():
        if not hasattr(config, name):
            raise ValueError(f"{path.name}: its config has no field {name!r}")
        setattr(config, name, value)
    loader = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    loader.from_config(config).save_pretrained(out)
    return out


def _build_toy(preset: ToyPreset, vision_path: Path, llm_path: Path, tokenizer, qformer_tokenizer,
               image_processor, dtype: torch.dtype) -> ModelBundle:
    qformer_config = build_qformer_config(AutoConfig.from_pretrained(vision_path).hidden_size,
                                        len(qformer_tokenizer), use_qformer_text_input=False)
    model = build_stage2_model(vision_path, llm_path, qformer_config, preset.num_query_tokens,
                               tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), dtype=dtype)
    if preset.instruct:
        model = build_instruct_model(model, qformer_tokenizer)
    return ModelBundle(model, tokenizer, image_processor, qformer_tokenizer)


def load_preset(name: str, dtype: torch.dtype = torch.float32, backbones_root: str | Path | None = None,
                seed: int = 0) -> ModelBundle:
    """The model named ``name`` (see :func:`preset_names`) with its tokenizers and image processor."""
    if name in TOY:
        return build_toy(TOY[name], backbones_root, seed, dtype)
    if name in PUBLISHED:
        return import_pretrained(PUBLISHED[name], dtype=dtype)
    raise KeyError(f"unknown preset {name!r}; expected one of {preset_names()}")

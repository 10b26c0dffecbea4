"""Captions and answers from BLIP-2 / InstructBLIP: batched, one prompt per sample, decoded to strings.

Decoding itself is transformers' ``generate`` (the models' own ``generate`` feeds the projected queries
to the LLM's, which keeps a KV cache); this module builds its inputs exactly as the processors do
(``blip2.models.stage2.with_image_tokens``), validates the decoding parameters, seeds sampling without
touching the caller's random state, and strips the prompt that decoder-only ``generate`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from blip2.models.generation_params import GREEDY, GenerationParams
from blip2.models.instruct import encode_qformer_instructions, instruction_aware
from blip2.models.stage2 import encode_with_left_truncation, unwrap, with_image_tokens


def _language_tokenizer(tokenizer: PreTrainedTokenizerBase | object) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer itself, or the one inside a ``Blip2Processor`` / ``InstructBlipProcessor``."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def generate_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pixel_values: Tensor,
                 prompts: Sequence[str] | None = None, params: GenerationParams = GREEDY, seed: int | None = None,
                 max_text_length: int | None = None, qformer_input_ids: Tensor | None = None,
                 qformer_attention_mask: Tensor | None = None) -> Tensor:
    """Generated token ids, (B * num_return_sequences, L), without the prompt, padded with pad ids.

    ``model`` is a ``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration`` (or a
    ``Blip2Stage2`` around one); pixel_values (B, 3, H, W); ``prompts`` one per image (default: none,
    captioning). ``seed`` makes sampling reproducible without changing the global random state.
    """
    root, model = model, unwrap(model)  # modes are set on the root: a Blip2Stage2 keeps backbones in eval
    tokenizer = _language_tokenizer(tokenizer)
    batch = pixel_values.shape[0]
    prompts = [""] * batch if prompts is None else list(prompts)
    if len(prompts) != batch:
        raise ValueError(f"{batch} images but {len(prompts)} prompts")
    config = model.config
    prompt_ids = encode_with_left_truncation(tokenizer, prompts, max_text_length)
    input_ids, attention_mask = with_image_tokens(prompt_ids, tokenizer.pad_token_id, config.num_query_tokens,
                                                  config.image_token_index)
    device = model.query_tokens.device
    inputs = {"pixel_values": pixel_values.to(device, model.vision_model.embeddings.patch_embedding.weight.dtype),
              "input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if qformer_input_ids is not None:
        inputs["qformer_input_ids"] = qformer_input_ids.to(device)
        inputs["qformer_attention_mask"] = qformer_attention_mask.to(device)
    kwargs = {**params.generate_kwargs(), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "use_cache": True}
    was_training = root.training
    root.eval()
    try:
        with torch.random.fork_rng(devices=_cuda_devices(device)):
            if seed is not None:
                torch.manual_seed(seed)
            output = model.generate(**inputs, **kwargs)
    finally:
        root.train(was_training)
    if not config.text_config.is_encoder_decoder:
        output = output[:, input_ids.shape[1]:]  # decoder-only generate() returns the prompt too
    return output


def _cuda_devices(device: torch.device) -> list[int]:
    """The CUDA device whose random state sampling uses (fork_rng saves and restores it), or none."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def decode(tokenizer: PreTrainedTokenizerBase, ids: Tensor) -> list[str]:
    return [text.strip() for text in _language_tokenizer(tokenizer).batch_decode(ids, skip_special_tokens=True)]


def generate_captions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pixel_values: Tensor,
                      prompts: Sequence[str] | None = None, params: GenerationParams = GREEDY,
                      seed: int | None = None, max_text_length: int | None = None) -> list[str]:
    """Captions (or prompted continuations) from a BLIP-2 model: B * num_return_sequences strings, the
    sequences of one image next to each other. ``tokenizer``: the LLM's, or a ``Blip2Processor``."""
    ids = generate_ids(model, tokenizer, pixel_values, prompts, params, seed, max_text_length)
    return decode(tokenizer, ids)


def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | object, pixel_values: Tensor,
                     instructions: Sequence[str], params: GenerationParams = GREEDY,
                     qformer_tokenizer: PreTrainedTokenizerBase | None = None, seed: int | None = None,
                     max_qformer_length: int | None = None, max_text_length: int | None = None) -> list[str]:
    """Answers from an InstructBLIP model, one instruction per image: the instruction enters the
    Q-Former beside the queries and follows them in the LLM. ``tokenizer`` is the LLM's (then pass
    ``qformer_tokenizer``) or an ``InstructBlipProcessor`` holding both."""
    qformer_tokenizer = qformer_tokenizer or getattr(tokenizer, "qformer_tokenizer", None)
    if qformer_tokenizer is None:
        raise ValueError("InstructBLIP needs the Q-Former's tokenizer: pass qformer_tokenizer or a processor")
    if len(instructions) != pixel_values.shape[0]:
        raise ValueError(f"{pixel_values.shape[0]} images but {len(instructions)} instructions")
    qformer_ids, qformer_mask = encode_qformer_instructions(qformer_tokenizer, instructions, max_qformer_length,
                                                            instruction_aware(model.config))
    ids = generate_ids(model, tokenizer, pixel_values, instructions, params, seed, max_text_length,
                       qformer_ids, qformer_mask)
    return decode(tokenizer, ids)

"""One step of each job, written to run on fake tensors (see :mod:`blip2.planning.measure`).

Training steps run the project's real code: the stage-1 objective
(:class:`blip2.models.stage1.Stage1Objective`: ITC, ITM with hard negatives, ITG) and transformers'
``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration`` forwards with ``labels``,
then ``loss.backward()``. Inference steps (serving, CapFilt) run the parts of ``generate`` that cost
anything: the image encoder and Q-Former once per image, and the LLM over the prompt and every generated
token with its KV cache kept. A teacher-forced pass over ``prompt + new tokens`` does the same matmuls as
decoding them one by one with a cache, so its FLOPs are decoding's; decoding is slower than those FLOPs
suggest (it is memory-bound), which the plan's fixed MFU does not capture.

Sequence layouts follow :func:`blip2.models.stage2.build_stage2_batch`: decoder-only LLMs read
``<image>*32 prompt target``, encoder-decoder LLMs read ``<image>*32 prompt`` and decode ``target``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from blip2.models.qformer import Blip2QFormerForPretraining
from blip2.models.stage1 import Stage1Objective


@dataclass(frozen=True)
class Shapes:
    """Sizes of one step's inputs, per worker. ``prompt`` tokens go to the LLM before the target (the
    instruction for InstructBLIP, which also enters the Q-Former; T5's caption prefix in stage 2);
    ``target`` tokens are predicted (the caption, the answer, the generated text)."""

    batch: int
    prompt: int
    target: int
    image_size: int = 224
    num_captions: int = 1  # CapFilt: synthetic captions per image
    workers: int = 1  # stage 1: ITC and ITM's hard negatives see every worker's batch


def _ids(batch: int, length: int, high: int = 1000) -> torch.Tensor:
    return torch.randint(4, high, (batch, length))


def _pixels(model: nn.Module, shapes: Shapes, batch: int | None = None) -> torch.Tensor:
    dtype = next(model.vision_model.parameters()).dtype
    return torch.empty(batch or shapes.batch, 3, shapes.image_size, shapes.image_size, dtype=dtype)


def _as_if_gathered(tensor: torch.Tensor, rank: int, world_size: int, with_grad: bool) -> torch.Tensor:
    """Stands in for the all-gather across ``world_size`` workers: a tensor of the gathered size (what a
    worker holds after the gather), built from copies of this worker's slice."""
    return torch.cat([tensor] * world_size) if world_size > 1 else tensor


def stage1_step(model: Blip2QFormerForPretraining, shapes: Shapes) -> None:
    """ITC + ITM + ITG over a batch of images and ``target``-token captions, then backward. As worker 0
    of ``workers``: ITC's similarities span every worker's batch, and ITM mines hard negatives from every
    worker's image embeddings and texts, which each worker therefore holds."""
    ids = _ids(shapes.batch, shapes.target)
    objective = Stage1Objective(rank=0, world_size=shapes.workers, gather=_as_if_gathered)
    out = objective(model, _pixels(model, shapes), ids, torch.ones_like(ids))
    out.loss.backward()


def _llm_inputs(model: nn.Module, shapes: Shapes, batch: int) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` / ``labels`` laid out as the training batches are."""
    config = model.config
    images = torch.full((batch, config.num_query_tokens), config.image_token_index)
    prompt = _ids(batch, shapes.prompt)
    target = _ids(batch, shapes.target)
    if config.text_config.is_encoder_decoder:
        input_ids = torch.cat([images, prompt], 1)
        labels = target
    else:
        input_ids = torch.cat([images, prompt, target], 1)
        labels = torch.cat([torch.full((batch, images.shape[1] + shapes.prompt), -100), target], 1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def stage2_step(model: nn.Module, shapes: Shapes) -> None:
    """``Blip2ForConditionalGeneration(pixel_values, input_ids, attention_mask, labels)``, then backward."""
    out = model(pixel_values=_pixels(model, shapes), **_llm_inputs(model, shapes, shapes.batch))
    out.loss.backward()


def instruct_step(model: nn.Module, shapes: Shapes) -> None:
    """InstructBLIP: the ``prompt`` (instruction) enters the Q-Former and the LLM; then backward."""
    instruction = _ids(shapes.batch, max(shapes.prompt, 1))
    out = model(pixel_values=_pixels(model, shapes), qformer_input_ids=instruction,
                qformer_attention_mask=torch.ones_like(instruction), **_llm_inputs(model, shapes, shapes.batch))
    out.loss.backward()


def _query_outputs(model: nn.Module, shapes: Shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings (B, N, D_vision) and projected query outputs (B, Q, D_llm), as ``generate`` makes them."""
    image_embeds = model.vision_model(pixel_values=_pixels(model, shapes)).last_hidden_state
    queries = model.query_tokens.expand(shapes.batch, -1, -1)
    kwargs = {}
    if hasattr(model.qformer, "embeddings"):  # InstructBLIP: the instruction beside the queries
        instruction = _ids(shapes.batch, max(shapes.prompt, 1))
        kwargs = {"input_ids": instruction, "attention_mask": torch.ones(
            shapes.batch, queries.shape[1] + instruction.shape[1], dtype=torch.long)}
        out = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, **kwargs)
        query_output = out.last_hidden_state[:, :queries.shape[1]]
    else:
        query_output = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
    return image_embeds, model.language_projection(query_output.to(model.language_projection.weight.dtype))


def generate_step(model: nn.Module, shapes: Shapes) -> object:
    """What generating ``target`` tokens after a ``prompt`` costs, ``num_captions`` per image, KV cache
    kept (returned, so that its memory counts)."""
    _, projected = _query_outputs(model, shapes)  # (B, Q, D_llm), no grad anywhere
    k = shapes.num_captions
    projected = projected.repeat_interleave(k, dim=0)  # (B*K, Q, D)
    llm = model.language_model
    embed = llm.get_input_embeddings()
    prompt = embed(_ids(projected.shape[0], shapes.prompt)).to(projected.dtype)
    generated = _ids(projected.shape[0], shapes.target)
    if model.config.text_config.is_encoder_decoder:
        return llm(inputs_embeds=torch.cat([projected, prompt], 1), decoder_input_ids=generated, use_cache=True)
    inputs = torch.cat([projected, prompt, embed(generated).to(projected.dtype)], 1)
    return llm(inputs_embeds=inputs, use_cache=True)


def filter_step(model: Blip2QFormerForPretraining, shapes: Shapes) -> None:
    """CapFilt's filter: ITM (and ITC) scores of the web caption and ``num_captions`` synthetic ones."""
    n = shapes.num_captions + 1
    image_embeds = model.encode_images(_pixels(model, shapes)).repeat_interleave(n, dim=0)  # (B*n, N, D)
    ids = _ids(shapes.batch * n, shapes.target)
    mask = torch.ones_like(ids)
    model.itm_logits(image_embeds, ids, mask)
    model.itc_similarity(model.image_features(image_embeds[::n]), model.text_features(ids, mask))


TRAINING_STEPS: dict[str, Callable[[nn.Module, Shapes], object]] = {
    "stage1": stage1_step, "stage2": stage2_step, "instruct": instruct_step}

"""Will it fit, and how long: memory per worker, largest batch, FLOPs, time and GPU-hours of a job.

For one preset and one stage, on one GPU type and ``workers`` GPUs:

- **memory per worker** = frozen weights in bf16 (2 bytes each) + trainable weights in fp32, their fp32
  gradients, AdamW's two fp32 moments and autocast's bf16 copy (4 + 4 + 8 + 2 bytes each) + the peak of
  what one step allocates, traced on fake tensors (:func:`blip2.planning.measure.measure_step`) with every
  weight in bf16, as autocast computes. Counting every gradient at the activation peak makes it an upper
  bound by at most the gradients' size (0.4-0.7 GB). Only ``memory_fraction`` of the GPU is usable.
- **largest batch**: the step's peak is measured at two batch sizes; it is affine in the batch, so the
  largest per-worker micro-batch that fits follows. A per-worker batch beyond it is reached with gradient
  accumulation (``accum`` micro-batches per optimiser step).
- **FLOPs per step**: ``FlopCounterMode`` over the same fake step, forward and backward.
- **time**: FLOPs / (``mfu`` x the GPU's bf16 peak x workers); wall time and GPU-hours over the schedule.
- **frozen-feature cache** (stages 1 and 2, which read the web corpus): the image encoder's output per
  image in bf16, for ``dataset_images`` images, and the encoder FLOPs it saves per epoch, in GPU-hours
  at the same MFU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from blip2.planning.config import (
    INSTRUCT_BATCH,
    INSTRUCT_STEPS,
    STAGE1_BATCH,
    STAGE1_STEPS,
    STAGE2_BATCH,
    STAGE2_STEPS,
    PlanConfig,
)
from blip2.planning.measure import FakeTensorMode, StepMeasure, measure_step, to_fake
from blip2.planning.presets import RealPreset, build_meta_model, build_meta_stage1, count_parameters, preset
from blip2.planning.steps import TRAINING_STEPS, Shapes, filter_step, generate_step

GIB = 2**30
TRAINABLE_BYTES = 4 + 4 + 8 + 2  # fp32 weight, fp32 gradient, AdamW's two fp32 moments, autocast's bf16 copy


@dataclass(frozen=True)
class PlanRow:
    """One job on one cluster. ``None`` where a figure does not apply (serving has no schedule)."""

    preset: str  # stage 1: "qformer-<image encoder>"
    stage: str
    gpu: str
    workers: int
    params: int  # of the model(s) the job holds
    trainable_params: int
    batch: int  # per worker per optimiser step (training), images per call (CapFilt), requests (serving)
    micro_batch: int  # what one forward holds: the batch split into `accum` micro-batches of at most max_batch
    accum: int  # micro-batches per step
    max_batch: int  # largest micro-batch that fits
    memory_gib: float  # per worker at micro_batch
    weights_gib: float  # weights (+ optimiser state) alone
    tflop_per_step: float  # per worker (per call for CapFilt / serving), counted
    step_seconds: float
    steps: int | None
    wall_days: float | None
    gpu_hours: float | None
    cache_tib: float | None = None
    cache_saves_gpu_hours_per_epoch: float | None = None
    epochs: float | None = None
    requests_per_second: float | None = None  # serving, per replica


class _Job:
    """The fake model(s) of a job and its step, to measure at any batch size."""

    def __init__(self, models: list[nn.Module], step: Callable[[int], object], mode: FakeTensorMode,
                 frozen_params: int, trainable_params: int) -> None:
        self.models, self.step, self.mode = models, step, mode
        self.frozen_params, self.trainable_params = frozen_params, trainable_params

    def measure(self, batch: int) -> StepMeasure:
        return measure_step(self.models, lambda: self.step(batch), self.mode)


def _prepare(model: nn.Module, trainable: tuple[str, ...], mode: FakeTensorMode) -> tuple[int, int]:
    """Freeze all but the ``trainable`` submodules / parameters, put every weight in bf16 (autocast's
    compute dtype), make it fake. Returns (frozen, trainable) parameter counts."""
    model.requires_grad_(False)
    for name in trainable:
        getattr(model, name).requires_grad_(True)
    trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_count = count_parameters(model) - trainable_count
    to_fake(model, mode, torch.bfloat16)
    return frozen_count, trainable_count


def _shapes(config: PlanConfig, p: RealPreset, stage: str, batch: int) -> Shapes:
    if stage == "stage1":
        return Shapes(batch, 0, config.text_length, workers=config.workers)
    if stage == "stage2":
        prefix = config.text_length // 4 if p.encoder_decoder else 0  # prefix LM: part of the caption in the encoder
        return Shapes(batch, prefix, config.text_length - prefix)
    if stage == "instruct":
        return Shapes(batch, config.instruction_length, config.answer_length)
    if stage == "capfilt":
        return Shapes(batch, config.prompt_length, config.new_tokens, num_captions=config.num_captions)
    return Shapes(batch, config.prompt_length, config.new_tokens)  # serve


def build_job(config: PlanConfig, p: RealPreset, stage: str, mode: FakeTensorMode) -> _Job:
    """The fake model(s) of ``stage`` for preset ``p`` and a step taking the batch size."""
    if stage == "stage1":  # everything but the image encoder trains
        model = build_meta_stage1(config.vision or p.vision)
        trainable = tuple(n for n, _ in model.named_children() if n != "vision_model") + ("query_tokens", "temp")
    else:
        model = build_meta_model(p)
        trainable = ("query_tokens", "qformer", "language_projection") if stage in TRAINING_STEPS else ()
    frozen, train = _prepare(model, trainable, mode)
    if stage in TRAINING_STEPS:
        return _Job([model], lambda b: TRAINING_STEPS[stage](model, _shapes(config, p, stage, b)), mode, frozen, train)

    def infer(b: int) -> object:
        with torch.no_grad():
            return generate_step(model, _shapes(config, p, stage, b))

    if stage == "serve":
        return _Job([model], infer, mode, frozen, 0)
    scorer = build_meta_stage1(p.vision)  # CapFilt: the stage-1 filter beside the captioner, on the same GPU
    scorer_params, _ = _prepare(scorer, (), mode)

    def capfilt(b: int) -> object:
        with torch.no_grad():
            filter_step(scorer, _shapes(config, p, stage, b))
            return generate_step(model, _shapes(config, p, stage, b))

    return _Job([model, scorer], capfilt, mode, frozen + scorer_params, 0)


def _schedule(config: PlanConfig, p: RealPreset, stage: str) -> tuple[int, int]:
    """(steps, global batch) of the paper's schedule for ``stage``, or of the config when it sets them."""
    if stage == "stage1":
        steps, batch = STAGE1_STEPS, STAGE1_BATCH[config.vision or p.vision]
    elif stage == "stage2":
        steps, batch = STAGE2_STEPS, STAGE2_BATCH["flan-t5" if p.encoder_decoder else "opt"]
    else:
        steps, batch = INSTRUCT_STEPS, INSTRUCT_BATCH[p.llm]
    return config.steps or steps, config.global_batch or batch


def plan_row(config: PlanConfig, preset_name: str, stage: str) -> PlanRow:
    """Measure and plan ``stage`` of ``preset_name`` on ``config``'s cluster."""
    p = preset(preset_name)
    gpu = config.device()
    mode = FakeTensorMode()
    job = build_job(config, p, stage, mode)
    training = stage in TRAINING_STEPS
    weights = job.frozen_params * 2 + job.trainable_params * TRAINABLE_BYTES
    if training:
        steps, global_batch = _schedule(config, p, stage)
        batch = math.ceil(global_batch / config.workers)
    else:
        steps, batch = None, config.capfilt_batch if stage == "capfilt" else config.serve_batch
    # The peak is affine in the batch: measure at two sizes, solve for the largest that fits.
    low, high = max(1, batch // 2), max(2, batch)
    m_low, m_high = job.measure(low), job.measure(high)
    per_sample = (m_high.peak_bytes - m_low.peak_bytes) / (high - low)
    fixed = m_high.peak_bytes - per_sample * high
    budget = gpu.memory_gib * GIB * config.memory_fraction - weights
    max_batch = max(0, int((budget - fixed) // per_sample)) if per_sample > 0 else batch
    accum = math.ceil(batch / max(1, min(batch, max_batch)))
    micro = math.ceil(batch / accum)  # the batch split evenly: 95 in 2 is 48 + 47, not 94 + 1
    memory = weights + fixed + per_sample * micro
    flops = m_high.flops / high * batch  # FLOPs are linear in the batch: every op is per sample
    step_seconds = flops / (config.mfu * gpu.bf16_tflops * 1e12)
    # Stage 1 has no LLM: its row is named by what it trains and over what.
    name = f"qformer-{config.vision or p.vision}" if stage == "stage1" else p.name
    row = dict(preset=name, stage=stage, gpu=gpu.name, workers=config.workers,
               params=job.frozen_params + job.trainable_params, trainable_params=job.trainable_params,
               batch=batch, micro_batch=micro, accum=accum, max_batch=max_batch, memory_gib=memory / GIB,
               weights_gib=weights / GIB, tflop_per_step=flops / 1e12, step_seconds=step_seconds,
               steps=steps, wall_days=None, gpu_hours=None)
    if stage == "serve":
        row["requests_per_second"] = batch / step_seconds
        return PlanRow(**row)
    if stage == "capfilt":
        steps = math.ceil(config.dataset_images / (batch * config.workers))
    wall = steps * step_seconds
    row.update(steps=steps, wall_days=wall / 86400, gpu_hours=wall * config.workers / 3600)
    if stage in ("stage1", "stage2"):  # web-scale pretraining reads the corpus; the cache could replace that
        vision_config = job.models[0].config.vision_config
        tokens = (vision_config.image_size // vision_config.patch_size) ** 2 + 1  # patches + [CLS]
        cache_bytes = config.dataset_images * tokens * vision_config.hidden_size * 2
        vision_per_image = m_high.vision_flops / high
        saved = vision_per_image * config.dataset_images / (config.mfu * gpu.bf16_tflops * 1e12) / 3600
        row.update(cache_tib=cache_bytes / 2**40, cache_saves_gpu_hours_per_epoch=saved,
                   epochs=steps * batch * config.workers / config.dataset_images)
    return PlanRow(**row)


def plan_jobs(config: PlanConfig) -> list[tuple[str, str]]:
    """The (preset, stage) pairs of ``config`` that apply: stage 1 once per image encoder (it has no
    LLM), stage 2 for BLIP-2 presets, instruction tuning for InstructBLIP ones, CapFilt and serving for all."""
    jobs, seen_stage1 = [], set()
    for name in config.presets:
        p = preset(name)
        for stage in config.stages:
            if stage == "stage1":
                vision = config.vision or p.vision
                if vision in seen_stage1:
                    continue
                seen_stage1.add(vision)
            if (stage == "stage2" and p.instruct) or (stage == "instruct" and not p.instruct):
                continue
            jobs.append((name, stage))
    return jobs


def plan_rows(config: PlanConfig, progress: Callable[[str], None] = lambda _: None) -> list[PlanRow]:
    """:func:`plan_row` for each of :func:`plan_jobs`, saying which one it measures as it goes."""
    jobs = plan_jobs(config)
    rows = []
    for i, (name, stage) in enumerate(jobs, 1):
        label = f"qformer-{config.vision or preset(name).vision}" if stage == "stage1" else name
        progress(f"plan: [{i}/{len(jobs)}] {stage} {label}: measuring on fake tensors")
        rows.append(plan_row(config, name, stage))
    return rows

"""The optimisation step every training loop shares, and the same training as one plain process.

:class:`StepRunner` turns micro-batches into optimiser steps: forward under autocast (bf16 on GPU),
backward of the loss scaled by the accumulation count, DDP gradient sync only on the last micro-batch,
gradient clipping, AdamW and the schedule. The Ray Train loop (``pipelines/train.py``) drives it on every
worker; :func:`train_locally` drives it in one process with no Ray at all — the baseline the Ray job is
benchmarked against, and a way to debug a stage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from blip2.training.config import TrainConfig
from blip2.training.optim import build_optimizer, build_scheduler


class StepRunner:
    """Micro-batches in, optimiser steps out."""

    def __init__(self, step_module: nn.Module, trainable: nn.Module, config: TrainConfig, device: torch.device,
                 grad_norm_groups: Mapping[str, list[nn.Parameter]] | None = None,
                 before_step: Callable[[int], None] | None = None) -> None:
        self.step_module = step_module
        # Called with the number of optimiser steps done before each step's first micro-batch (a loss
        # weight that follows a schedule); it reads the scheduler's count, so a resumed run picks up there.
        self.before_step = before_step
        # Named groups of parameters whose gradient norm (before clipping) joins each step's numbers, as
        # ``grad_norm/<name>`` (e.g. what reaches the Q-Former's cross-attention).
        self.grad_norm_groups = dict(grad_norm_groups or {})
        self.parameters = [p for p in trainable.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(trainable, config.optim.learning_rate, config.optim.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, config.optim.warmup_steps, config.optim.max_steps)
        self.accumulate = config.optim.grad_accum_steps
        self.grad_clip = config.optim.grad_clip
        self.autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                       enabled=device.type == "cuda" and config.scaling.mixed_precision)
        self.micro, self.totals = 0, {}

    def micro_step(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, float] | None:
        """Forward and backward one micro-batch; after every ``grad_accum_steps``-th, step the optimiser
        and return the step's losses (averaged over its micro-batches), else None."""
        if self.micro == 0 and self.before_step is not None:
            self.before_step(self.scheduler.last_epoch)
        last = self.micro + 1 == self.accumulate
        no_sync = getattr(self.step_module, "no_sync", None)  # DDP: all-reduce gradients once per step
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with self.autocast:
                losses = self.step_module(**inputs)
            (losses["loss"] / self.accumulate).backward()
        for name, value in losses.items():
            self.totals[name] = self.totals.get(name, 0.0) + value.item() / self.accumulate
        self.micro += 1
        if not last:
            return None
        for name, group in self.grad_norm_groups.items():
            grads = [p.grad.detach().float().norm() for p in group if p.grad is not None]
            self.totals[f"grad_norm/{name}"] = float(torch.stack(grads).norm()) if grads else 0.0
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals, self.micro, self.totals = self.totals, 0, {}
        return totals

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def time_own_step(self, micro_batches: list[Mapping[str, torch.Tensor]], steps: int) -> float:
        """Seconds per optimiser step of this very step (same model, optimiser, micro-batches already on
        the device), run ``steps`` times with nothing else in the way: the job's own step, timed in its
        own process. It trains on: call it only once the weights that count are saved."""
        start = time.perf_counter()
        for _ in range(steps):
            for inputs in micro_batches:
                self.micro_step(inputs)
        return (time.perf_counter() - start) / steps


class LoopClock:
    """Where a worker's training-loop time goes: seconds per phase (``data_wait``, ``batch_prep``,
    ``step_compute``, ``checkpointing``), and the wall clock (``time.time()``) of the first batch request
    so the driver can tell its start-up from the loop."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"data_wait": 0.0, "batch_prep": 0.0, "step_compute": 0.0,
                                          "checkpointing": 0.0}
        self.loop_started = time.time()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def timed(self, phase: str, iterable: Iterable[Any]) -> Iterator[Any]:
        """``iterable``'s items, the time spent waiting for each added to ``phase``."""
        iterator = iter(iterable)
        while True:
            with self(phase):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    def report(self) -> dict[str, float]:
        return {**{k: round(v, 3) for k, v in self.seconds.items()}, "loop_started": self.loop_started}


def train_locally(task: Any, batches: Callable[[int], Iterable[Mapping[str, Any]]], device: str = "cpu",
                  on_step: Callable[[int, dict[str, float]], None] | None = None) -> tuple[nn.Module, list[dict]]:
    """Train ``task`` (a :class:`blip2.training.tasks.TrainingTask`) for ``config.optim.max_steps`` steps
    in this process. ``batches(epoch)`` yields record batches of ``optim.batch_size``, as Ray Data's
    ``iter_batches`` would. Returns the trained model and the loss history (with seconds since start)."""
    config = task.config
    device = torch.device(device)
    model = task.prepare(task.build_model(), device, config.scaling.mixed_precision)
    step_module = task.step_module(model, 0, 1, device)
    runner = StepRunner(step_module, task.trainable_module(model), config, device, task.grad_norm_groups(model),
                        task.before_step)
    step_module.train()
    history: list[dict] = []
    start, step, epoch = time.perf_counter(), 0, 0
    while step < config.optim.max_steps:
        for index, batch in enumerate(batches(epoch)):
            rng = np.random.default_rng([config.seed, 0, epoch, index])
            losses = runner.micro_step({k: v.to(device) for k, v in task.make_batch(batch, rng).items()})
            if losses is None:
                continue
            step += 1
            history.append({"step": step, "time": round(time.perf_counter() - start, 3), **losses})
            if on_step is not None:
                on_step(step, losses)
            if step >= config.optim.max_steps:
                break
        epoch += 1
    model.eval()
    return model, history

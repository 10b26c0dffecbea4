"""Resumable training state in safetensors + JSON: nothing is ever unpickled.

A checkpoint directory holds

    trainable.safetensors   the trainable parameters (frozen backbones are reloaded from their own
                            directories, never written again)
    optimizer.safetensors   the optimiser's per-parameter tensors (AdamW: step, exp_avg, exp_avg_sq)
    state.json              optimiser hyperparameters, the scheduler, the step and the data position

so a run resumed from it continues exactly where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from blip2.models.export import load_trainable, save_trainable

TRAINABLE, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.safetensors", "state.json"


@dataclass
class TrainingProgress:
    """Where a run is: optimiser steps taken, and where in the data the next batch comes from."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    extra: dict = field(default_factory=dict)  # JSON-serialisable job-specific counters


def save_training_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, progress: TrainingProgress) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_trainable(model, directory / TRAINABLE)
    optimizer_state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().contiguous()
               for index, entry in optimizer_state["state"].items() for name, value in entry.items()
               if isinstance(value, torch.Tensor)}
    save_file(tensors, directory / OPTIMIZER)
    scalars = {str(index): {name: value for name, value in entry.items() if not isinstance(value, torch.Tensor)}
               for index, entry in optimizer_state["state"].items()}
    state = {"optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars},
             "scheduler": scheduler.state_dict(), "progress": progress.__dict__}
    (directory / STATE).write_text(json.dumps(state, indent=1))
    return directory


def load_training_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> TrainingProgress:
    """Restore what :func:`save_training_state` wrote into freshly built ``model``/``optimizer``/``scheduler``
    (built with the same config); returns the progress to continue from."""
    directory = Path(directory)
    missing = [name for name in (TRAINABLE, OPTIMIZER, STATE) if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a training checkpoint (missing {', '.join(missing)})")
    load_trainable(model, directory / TRAINABLE)
    state = json.loads((directory / STATE).read_text())
    per_parameter: dict[int, dict] = {int(i): dict(v) for i, v in state["optimizer"]["scalars"].items()}
    for key, value in load_file(directory / OPTIMIZER).items():
        index, name = key.split(".", 1)
        per_parameter.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_parameter, "param_groups": state["optimizer"]["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    return TrainingProgress(**state["progress"])

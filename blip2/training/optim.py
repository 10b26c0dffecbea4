"""The optimiser and learning-rate schedule of every BLIP-2 training stage.

AdamW with betas (0.9, 0.98) and weight decay 0.05 on matrices only (no decay on biases, norms or the
temperature), as the paper's recipe; the learning rate warms up linearly per step, then decays on a
cosine to zero.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (>= 2-D: weight matrices, query tokens) and an
    undecayed one (biases, norm weights, scalars such as the ITC temperature)."""
    decay, no_decay = [], []
    for parameter in model.parameters():  # shared (tied) parameters are yielded once
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.05,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8) -> torch.optim.AdamW:
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warmup over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)

"""One trial's training, in this process (``blip2 reproduce``): a stage trained from its config with
:func:`blip2.training.loop.train_locally` on the toy world's ``train_split``.

The trial's seed is the config's ``seed``: it sets the trainable parts' initialisation (``build_model``),
each epoch's batch order (below) and every draw inside training (caption choice, ITM negatives,
instruction families: ``train_locally`` derives them from it). The frozen backbones are the shipped ones,
the same in every trial. Stage 1 with ``feature_cache`` trains from the frozen encoder's features,
computed once per process and toy world (the encoder is frozen and deterministic: the same features it
would compute each step). Scoring is not here: ``pipelines/reproduce.py`` scores the export with
``blip2 evaluate``'s code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from blip2.toyworld.corpus import generate_split
from blip2.toyworld.world import decode_image
from blip2.training.config import TrainConfig
from blip2.training.features import FrozenImageEncoder
from blip2.training.loop import train_locally
from blip2.training.tasks import Stage1Task, TrainingTask

_BATCHES: dict[tuple, list[dict]] = {}  # (world, split, batch size, encoder or None) -> record batches


def record_batches(task: TrainingTask) -> list[dict]:
    """The toy world's ``train_split`` as batches of ``optim.batch_size`` records (decoded images and
    alt-texts, as Ray Data's WebDataset reader gives them), or of stage 1's cached image features."""
    config: TrainConfig = task.config
    if config.train_data:
        raise ValueError("an in-process trial trains on the toy world's train_split; train_data is not read here")
    features = isinstance(task, Stage1Task) and config.feature_cache
    key = (config.world, config.train_split, config.optim.batch_size, str(task.backbones.vision) if features else None)
    if key not in _BATCHES:
        records = generate_split(config.world, config.train_split)  # test / novel raise (selection guard)
        size = config.optim.batch_size
        batches = [{"jpg": np.stack([decode_image(r.image) for r in records[s : s + size]]),
                    "txt": np.array([r.alt_text for r in records[s : s + size]], dtype=object)}
                   for s in range(0, len(records) - size + 1, size)]
        if not batches:
            raise ValueError(f"{config.train_split}: {len(records)} records, fewer than one batch of "
                             f"optim.batch_size={size}")
        if features:
            encoder = FrozenImageEncoder(task.backbones.vision)
            batches = [encoder(batch) for batch in batches]
        _BATCHES[key] = batches
    return _BATCHES[key]


def train_trial(task: TrainingTask, threads: int = 1,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> tuple[nn.Module, list[dict]]:
    """Train ``task`` in this process on ``threads`` torch threads; the batch order of each epoch is drawn
    from the config's seed. Returns the model (in eval mode) and the loss history."""
    config = task.config
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batches = record_batches(task)

        def epoch_batches(epoch: int) -> list[Mapping]:
            return [batches[i] for i in np.random.default_rng([config.seed, epoch]).permutation(len(batches))]

        return train_locally(task, epoch_batches, on_step=on_step)
    finally:
        torch.set_num_threads(previous)

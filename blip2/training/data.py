"""From training records (:mod:`blip2.training.records`) to model batches: token ids, match ids, pixels."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from blip2.backbones.vision import pixel_values
from blip2.toyworld.text import parse_attributes
from blip2.toyworld.world import ATTRIBUTES


def match_ids(texts: Sequence[str]) -> torch.Tensor:
    """An id per caption such that captions known to describe the same thing share it, (B,) int64.

    ITC must not push such pairs apart (LAVIS does the same with image ids). A caption is keyed by the
    attributes it states when it states all four (so every phrasing of "a small red circle on the
    left" matches), otherwise by its normalised text. Read from the text alone, never from labels."""
    keys = []
    for text in texts:
        stated = parse_attributes(text)
        key = "|".join(stated[name] for name in ATTRIBUTES) if len(stated) == len(ATTRIBUTES) else \
            " ".join(text.lower().split())
        keys.append(zlib.crc32(key.encode()))
    return torch.tensor(keys, dtype=torch.int64)


def stated_attributes(texts: Sequence[str]) -> torch.Tensor:
    """What each caption states, (B, 4) int64: per attribute (shape, colour, size, position) the index of
    the stated value, -1 where the caption states none. Read from the text alone (diagnostics only)."""
    rows = []
    for text in texts:
        stated = parse_attributes(text)
        rows.append([ATTRIBUTES[name].index(stated[name]) if name in stated else -1 for name in ATTRIBUTES])
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(ATTRIBUTES))


def stage1_text_inputs(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                       max_length: int) -> dict[str, torch.Tensor]:
    """Captions -> ``input_ids`` and ``attention_mask`` (B, max_length: padded to a fixed length, since ITM
    gathers them across workers), and ``ids`` (B,) from :func:`match_ids`."""
    text = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt")
    return {"input_ids": text.input_ids, "attention_mask": text.attention_mask, "ids": match_ids(texts)}


def stage1_batch(images: np.ndarray | Sequence[np.ndarray], texts: Sequence[str],
                 tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, torch.Tensor]:
    """uint8 images (B, H, W, 3) and captions -> ``pixel_values`` (B, 3, H, W) and
    :func:`stage1_text_inputs`."""
    return {"pixel_values": pixel_values(np.stack(list(images))), **stage1_text_inputs(texts, tokenizer, max_length)}


def sample_captions(choices: Sequence[Sequence[str]], rng: np.random.Generator) -> list[str]:
    """One caption per record, uniformly among its candidates (BLIP-2 samples one of its top two)."""
    return [texts[int(rng.integers(len(texts)))] if len(texts) > 1 else texts[0] for texts in choices]


def task_mixture(sizes: Mapping[str, int]) -> dict[str, float]:
    """InstructBLIP's dataset balancing: each task's sampling probability is proportional to the square
    root of its size, so small tasks are not drowned and large ones not over-fitted. Size 0: never."""
    roots = {task: float(np.sqrt(size)) for task, size in sizes.items() if size > 0}
    if not roots:
        raise ValueError("no task has any examples")
    total = sum(roots.values())
    return {task: root / total for task, root in roots.items()}

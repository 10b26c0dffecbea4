"""From records (as Ray Data or a plain reader yields them) to model batches."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

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


def stage1_batch(images: np.ndarray | Sequence[np.ndarray], texts: Sequence[str],
                 tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, torch.Tensor]:
    """uint8 images (B, H, W, 3) and captions -> ``pixel_values`` (B, 3, H, W), ``input_ids`` and
    ``attention_mask`` (B, max_length: padded to a fixed length, since ITM gathers them across
    workers), and ``ids`` (B,) from :func:`match_ids`."""
    text = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt")
    return {"pixel_values": pixel_values(np.stack(list(images))), "input_ids": text.input_ids,
            "attention_mask": text.attention_mask, "ids": match_ids(texts)}

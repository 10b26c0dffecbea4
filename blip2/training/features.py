"""The frozen-feature cache: the frozen image encoder's outputs, computed once and trained from.

Stage 1 runs its frozen image encoder on every image of every epoch, although the encoder never changes
and, without augmentation, neither do its inputs. :class:`FrozenImageEncoder` turns batches of records
into batches of ``image_embeds`` (the encoder's last hidden state, what the Q-Former cross-attends to)
carrying the captions along; ``pipelines/train_data.py`` runs it as a Ray Data stage once, writes the
result to Parquet (reused by a later run) and trains from it (held in the object store when the job
materialises its data, else read back). Training from the cache gives the same losses as training from pixels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Blip2VisionModel

from blip2.backbones.vision import pixel_values
from blip2.training.records import CAPTIONS_JSON, TEXT_COLUMNS, batch_images


class FrozenImageEncoder:
    """A callable over record batches: ``{image column, caption column, ...}`` -> ``{"image_embeds":
    (B, N, D) float32, <caption column>, "key" when present}``. Loads the encoder once per instance."""

    def __init__(self, vision_path: str | Path, device: str = "cpu", threads: int = 0) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        # fp32 everywhere: the cache is computed once, and the Q-Former reads fp32 features (cast_backbones)
        self.model = Blip2VisionModel.from_pretrained(vision_path, dtype=torch.float32).to(self.device).eval()
        self.image_size = self.model.config.image_size

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        pixels = pixel_values(batch_images(batch, self.image_size)).to(self.device)
        embeds = self.model(pixel_values=pixels).last_hidden_state.float().cpu().numpy()
        out: dict[str, Any] = {"image_embeds": embeds}
        for name in (CAPTIONS_JSON, *TEXT_COLUMNS, "key", "__key__"):
            if name in batch:
                out[name] = batch[name]
        if "captions" in out:  # lists of captions (CapFilt output) as JSON text: Parquet-safe, no pickling
            out[CAPTIONS_JSON] = np.array([json.dumps([str(c) for c in v]) for v in out.pop("captions")], dtype=object)
        return out

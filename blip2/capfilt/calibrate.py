"""Choosing the filter's threshold on held-out data whose truth is known (never on the corpus being
filtered): score right captions and wrong ones built the way web alt-texts go wrong, and take the
threshold that flags wrong ones best (F1, "wrong" the positive class).

The wrong captions are built from the toy world's attributes (another image's caption, the right one
with one attribute changed, web junk), so this calibrates on the toy world's ``val`` split; for a real
corpus, score a hand-labelled sample and call :func:`choose_threshold` on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from blip2.images import load_image
from blip2.metrics import filter_precision_recall
from blip2.toyworld.corpus import Record
from blip2.toyworld.text import junk_text, random_caption
from blip2.toyworld.world import ATTRIBUTES


def calibration_pairs(records: Sequence[Record], seed: int = 0) -> tuple[np.ndarray, list[list[str]], list[list[bool]]]:
    """Per record: its image (N, H, W, 3) uint8, [right caption, wrong caption], [True, False]. The wrong
    kinds cycle swap / attribute / junk, as the web split's noise does."""
    rng = np.random.default_rng(seed)
    images, texts, right = [], [], []
    for i, record in enumerate(records):
        kind = i % 3
        if kind == 0:  # another image's caption, stating other attributes
            others = [r for r in records if r.attributes != record.attributes]
            wrong = random_caption(others[int(rng.integers(len(others)))].attributes, rng)
        elif kind == 1:  # one attribute changed
            name = tuple(ATTRIBUTES)[int(rng.integers(len(ATTRIBUTES)))]
            values = [v for v in ATTRIBUTES[name] if v != getattr(record.attributes, name)]
            wrong = random_caption(record.attributes.replace(**{name: values[int(rng.integers(len(values)))]}), rng)
        else:
            wrong = junk_text(rng) or "click here"
        images.append(np.asarray(load_image(record.image)))
        texts.append([random_caption(record.attributes, rng), wrong])
        right.append([True, False])
    return np.stack(images), texts, right


def choose_threshold(scores: Sequence[float], right: Sequence[bool]) -> dict:
    """The threshold (a midpoint between adjacent distinct scores) that maximises F1 of flagging wrong
    captions (score < threshold), with its precision/recall."""
    scores = np.asarray(scores, dtype=float)
    wrong = [not r for r in right]
    values = np.unique(scores)
    candidates = np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [1.0]]) if len(values) > 1 else np.array([0.5])
    best = None
    for threshold in candidates:
        quality = filter_precision_recall(list(scores < threshold), wrong)
        if best is None or quality["f1"] > best["f1"]:
            best = {"threshold": float(threshold), **quality}
    return best


class Scorer(Protocol):
    """What :func:`calibrate` needs of a filter (:class:`blip2.capfilt.models.CaptionFilter` is one)."""

    def score(self, pixels: np.ndarray, texts: Sequence[Sequence[str]]) -> list[np.ndarray]: ...


def calibrate(scorer: Scorer, records: Sequence[Record], seed: int = 0, batch_size: int = 64) -> dict:
    """Score :func:`calibration_pairs` of ``records`` (held-out, with known attributes) with ``scorer`` and
    :func:`choose_threshold` on them: ``{"threshold", "precision", "recall", "f1", "pairs"}``."""
    images, texts, right = calibration_pairs(records, seed)
    scores = [float(value) for start in range(0, len(images), batch_size)
              for row in scorer.score(images[start : start + batch_size], texts[start : start + batch_size])
              for value in row]
    return {**choose_threshold(scores, [r for row in right for r in row]), "pairs": len(scores)}

"""The captioner and the filter: plain classes that load their weights once and map a batch to a batch.

A batch is a dict of equal-length columns (numpy arrays or lists), as Ray Data's ``batch_format="numpy"``
hands to a callable class and as the single-process benchmark builds itself. Rows whose ``status`` is
not ``"ok"`` (rejected upstream) pass through untouched, so every record reaches the end and is counted.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from blip2.backbones.build import find_backbones
from blip2.capfilt.config import CaptionerConfig, FilterConfig
from blip2.capfilt.records import OK, REJECTED
from blip2.capfilt.select import candidates, normalise, select_captions
from blip2.models.export import ModelBundle, import_pretrained, import_stage1
from blip2.models.generation import GenerationParams, generate_captions
from blip2.models.presets import TOY, load_preset
from blip2.models.scoring import itm_probability
from blip2.models.stage1 import build_stage1_model

KEPT, FILTERED = "kept", "filtered"
TOY_STAGE1 = "toy-stage1"  # an untrained stage-1 model over the toy backbones (tests, benchmarks)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_pixel_values(pixels: np.ndarray, image_processor: Any) -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) -> the model's normalised pixel_values (B, 3, S, S): the image processor's
    resize / rescale / normalise, done on the whole batch at once."""
    size = image_processor.size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    if pixels.shape[1:3] != (height, width):
        pixels = np.stack([np.asarray(Image.fromarray(p).resize((width, height), Image.BICUBIC)) for p in pixels])
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() * image_processor.rescale_factor
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def _ok(batch: dict[str, Any]) -> np.ndarray:
    return np.asarray([status == OK for status in batch["status"]], dtype=bool)


# List-valued columns (synthetic captions, scores, kept captions) travel as JSON strings: an Arrow list
# column whose batch happens to hold only empty lists gets another type than its neighbours, and Ray
# Data then cannot concatenate the blocks.
LIST_COLUMNS = ("synthetic", "synthetic_scores", "captions", "caption_sources", "caption_scores")


def encode_list(values: Sequence[Any]) -> str:
    return json.dumps([v.item() if isinstance(v, np.generic) else v for v in values])


def decode_list(value: Any) -> list:
    """A list column's value as a list: JSON text, or a list/array."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return json.loads(value) if value else []
    return list(value)


def _json_column(values: Sequence[Sequence[Any]]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = [encode_list(v) for v in values]
    return column


# ---------------------------------------------------------------------------------------------------
# Captioner


def load_captioner(source: str) -> ModelBundle:
    """A toy preset name (``toy-opt``, ``toy-t5``) or a ``Blip2ForConditionalGeneration`` directory."""
    if source in TOY:
        return load_preset(source)
    if not Path(source).is_dir():
        raise FileNotFoundError(f"captioner source {source!r} is neither a toy preset ({', '.join(TOY)}) "
                                "nor a directory")
    return import_pretrained(source)


def caption_params(config: CaptionerConfig) -> GenerationParams:
    """Decoding for K = ``num_captions`` captions per image: K nucleus samples, or the K best beams."""
    k = max(config.num_captions, 1)
    if config.decoding == "beam":
        return GenerationParams(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                                num_beams=config.num_beams, num_return_sequences=k)
    return GenerationParams(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                            do_sample=True, top_p=config.top_p, temperature=config.temperature, num_return_sequences=k)


class Captioner:
    """K synthetic captions per image by nucleus sampling (or beam search: ``decoding``). Adds column ``synthetic`` (a list of str per
    row; empty for rows that are not ok)."""

    def __init__(self, config: CaptionerConfig, device: str = "auto") -> None:
        self.config = config
        self.device = resolve_device(device)
        bundle = load_captioner(config.source)
        if bundle.is_instruct:
            raise ValueError(f"captioner {config.source}: an InstructBLIP model; CapFilt captions with BLIP-2")
        self.model = bundle.model.to(self.device).eval()
        self.tokenizer, self.image_processor = bundle.tokenizer, bundle.image_processor
        self.params = caption_params(config)

    def caption(self, pixels: np.ndarray, seed: int) -> list[list[str]]:
        """uint8 RGB (B, H, W, 3) -> B lists of K captions (empty strings dropped)."""
        if self.config.num_captions == 0 or len(pixels) == 0:
            return [[] for _ in range(len(pixels))]
        k = self.config.num_captions
        prompts = [self.config.prompt] * len(pixels) if self.config.prompt else None
        texts = generate_captions(self.model, self.tokenizer, to_pixel_values(pixels, self.image_processor),
                                  prompts, self.params, seed=seed)
        return [[t for t in texts[i * k:(i + 1) * k] if t] for i in range(len(pixels))]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ok = _ok(batch)
        synthetic: list[list[str]] = [[] for _ in range(len(ok))]
        if ok.any():
            # The seed follows the batch's first key, not the actor or the order of arrival: a batch that
            # is redone after a failure draws the same captions.
            first = str(batch["key"][int(np.argmax(ok))])
            captions = self.caption(np.asarray(batch["pixels"])[ok], self.config.seed + zlib.crc32(first.encode()))
            for i, texts in zip(np.flatnonzero(ok), captions, strict=True):
                synthetic[i] = texts
        return {**batch, "synthetic": _json_column(synthetic)}


# ---------------------------------------------------------------------------------------------------
# Filter


def _stage1_dir(source: Path) -> Path:
    """A training run's output holds the export in ``model/``; accept either."""
    return source / "model" if (source / "model" / "config.json").exists() else source


def load_filter(config: FilterConfig):
    """(stage-1 model, Q-Former tokenizer, image processor) for ``config.source``."""
    backbones = find_backbones()
    if config.source == TOY_STAGE1:
        torch.manual_seed(0)
        model = build_stage1_model(backbones.vision, backbones.qformer_tokenizer)
        directory = None
    else:
        directory = _stage1_dir(Path(config.source))
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"filter source {config.source!r} is neither {TOY_STAGE1!r} nor a directory "
                                    "holding a Blip2ForImageTextRetrieval export")
    tokenizer_source = config.tokenizer or (
        directory if directory and (directory / "tokenizer_config.json").exists() else backbones.qformer_tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    processor_source = config.image_processor or (
        directory if directory and (directory / "preprocessor_config.json").exists() else backbones.vision)
    image_processor = AutoImageProcessor.from_pretrained(processor_source)
    if directory is not None:
        # The filter scores with ITM / ITC only: a directory without our side file (no ITG head, a
        # tokenizer without [DEC], as Salesforce published theirs) serves as well as one with it.
        model = import_stage1(directory)
    return model, tokenizer, image_processor


def check_sources(captioner: CaptionerConfig, scorer: FilterConfig) -> None:
    """Fail fast, on the driver, with a sentence — not inside an actor's constructor on a worker."""
    if captioner.num_captions > 0 and captioner.source not in TOY and not (Path(captioner.source) / "config.json").is_file():
        raise FileNotFoundError(f"captioner.source {captioner.source!r} is neither a toy preset ({', '.join(TOY)}) "
                                "nor a Blip2ForConditionalGeneration directory")
    if scorer.source != TOY_STAGE1 and not (_stage1_dir(Path(scorer.source)) / "config.json").is_file():
        raise FileNotFoundError(f"filter.source {scorer.source!r} is neither {TOY_STAGE1!r} nor a stage-1 export "
                                "(train one with `blip2 train stage1 train_split=clean`; its model/ directory; "
                                "`make capfilt-bootstrap` writes the toy config's runs/capfilt/capfilt-boot-r2/model)")


class CaptionFilter:
    """Scores every candidate caption of an image (the web one and the synthetic ones) — by ITM match
    probability, or by ITC similarity with ``score="itc"`` — and keeps the best ``top_n`` at or above
    ``threshold``.

    Adds ``web_score`` (nan when there is no web caption), ``synthetic_scores`` (per synthetic caption,
    in the order of ``synthetic``), ``captions`` / ``caption_sources`` / ``caption_scores`` (the kept
    ones, best first), ``best_score``; sets ``status`` to ``kept`` or ``filtered`` for ok rows.
    Drops ``pixels``: nothing downstream needs them."""

    def __init__(self, config: FilterConfig, device: str = "auto") -> None:
        self.config = config
        self.device = resolve_device(device)
        model, self.tokenizer, self.image_processor = load_filter(config)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def score(self, pixels: np.ndarray, texts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """uint8 RGB (B, H, W, 3) and B lists of texts -> B float32 arrays of scores (P(match) or cosine)."""
        counts = [len(t) for t in texts]
        flat = [text for group in texts for text in group]
        if not flat:
            return [np.zeros(0, dtype=np.float32) for _ in texts]
        image_embeds = self.model.encode_images(to_pixel_values(pixels, self.image_processor).to(self.device))
        owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor(counts)).to(self.device)  # (T,)
        tokens = self.tokenizer(flat, padding="max_length", truncation=True, max_length=self.config.max_text_length,
                                return_tensors="pt").to(self.device)
        if self.config.score == "itc":
            image_features = self.model.image_features(image_embeds)[owner]  # (T, Q, D)
            text_features = self.model.text_features(tokens.input_ids, tokens.attention_mask)  # (T, D)
            score = torch.einsum("tqd,td->tq", image_features, text_features).max(dim=-1).values  # (T,)
        else:
            score = itm_probability(self.model, image_embeds[owner], tokens.input_ids, tokens.attention_mask,
                                    batch_size=max(self.config.batch_size, 1) * 4)  # (T,)
        return list(np.split(score.float().cpu().numpy(), np.cumsum(counts)[:-1]))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ok = _ok(batch)
        n = len(ok)
        web_text = [str(t) if t else None for t in batch["web_text"]]
        synthetic = [[str(t) for t in decode_list(s)] for s in batch.get("synthetic", [None] * n)]
        groups = [candidates(web_text[i], synthetic[i]) if ok[i] else ([], []) for i in range(n)]
        indices = np.flatnonzero(ok)
        scores = dict(zip(indices, self.score(np.asarray(batch["pixels"])[ok], [groups[i][0] for i in indices]),
                          strict=True))
        status = list(batch["status"])
        web_score = np.full(n, np.nan, dtype=np.float32)
        synthetic_scores, kept, sources, kept_scores = [], [], [], []
        best = np.full(n, np.nan, dtype=np.float32)
        for i in range(n):
            texts, origin = groups[i]
            row_scores = scores.get(i, np.zeros(0, dtype=np.float32))
            by_text = {normalise(t): float(s) for t, s in zip(texts, row_scores, strict=True)}
            if ok[i] and web_text[i]:
                web_score[i] = row_scores[0]
            synthetic_scores.append([by_text.get(normalise(t), float("nan")) for t in synthetic[i]])
            selection = select_captions(texts, origin, row_scores.tolist(), self.config.threshold, self.config.top_n)
            kept.append(selection.captions)
            sources.append(selection.sources)
            kept_scores.append(selection.scores)
            if selection.best_score is not None:
                best[i] = selection.best_score
            if ok[i]:
                status[i] = KEPT if selection.kept else FILTERED
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out.update(status=np.asarray(status, dtype=object), web_score=web_score, synthetic=_json_column(synthetic),
                   synthetic_scores=_json_column(synthetic_scores), captions=_json_column(kept),
                   caption_sources=_json_column(sources), caption_scores=_json_column(kept_scores),
                   best_score=best)
        return out


__all__ = ["Captioner", "CaptionFilter", "KEPT", "FILTERED", "REJECTED", "TOY_STAGE1", "load_captioner",
           "load_filter", "to_pixel_values"]

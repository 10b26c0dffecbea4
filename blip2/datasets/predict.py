"""A model over evaluation items, batch by batch: what each ``blip2 evaluate`` actor holds.

:class:`SetPredictor` loads a checkpoint once and answers batches of the three kinds of work the
tasks need: captions / answers from a generative model (transformers' BLIP-2 or InstructBLIP layout,
through :mod:`blip2.serving.runtime`, which Serve also uses), ITC embeddings of images or texts, and
ITM logits of one image against several texts from a retrieval model (a stage-1 export or any
``Blip2ForImageTextRetrieval`` directory). No Ray here; ``pipelines/evaluate.py`` runs it on actors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip2.datasets.errors import DatasetError
from blip2.images import load_image
from blip2.models.generation_params import GenerationParams
from blip2.models.presets import TOY
from blip2.models.qformer import Blip2QFormerForPretraining
from blip2.serving.requests import GenerationRequest
from blip2.serving.runtime import (
    TOY_STAGE1,
    RetrievalModel,
    RuntimeSettings,
    VisionLanguageRuntime,
    load_bundle,
    load_retrieval,
)

CHECKPOINT_WHAT = ("a transformers checkpoint directory (config.json + *.safetensors, with its tokenizer and "
                   "image processor): Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration for "
                   "captions and questions, a stage-1 export or Blip2ForImageTextRetrieval for retrieval")


def require_checkpoint(path: str) -> str:
    """``path`` if it holds a transformers config (or names an untrained toy preset: ``toy-stage1``,
    ``toy-opt``, ...), else a clear error saying what to put there. Hub names are refused: nothing is
    downloaded."""
    if not path:
        raise DatasetError(f"set model= to {CHECKPOINT_WHAT}")
    if path in TOY or path == TOY_STAGE1:
        return path
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise DatasetError(f"no checkpoint at {directory} (no config.json): put {CHECKPOINT_WHAT} there "
                           f"(nothing is downloaded; save_pretrained writes this layout, and so do "
                           f"`blip2 train stage1|stage2|instruct`, in <storage_path>/<name>/model)")
    return path


def read_image(path: str) -> Image.Image:
    """The RGB image at ``path``; raises :class:`blip2.images.ImageError` (a ``ValueError``) if undecodable."""
    return load_image(Path(path).read_bytes())


class SetPredictor:
    """Captions, answers, embeddings and ITM logits from one loaded checkpoint (see the module docstring).

    ``retrieval`` selects the model kind: a retrieval model (``tokenizer`` / ``image_processor`` name
    directories for exports that lack them), else a generative one decoding with ``params``.
    """

    def __init__(self, model: str, retrieval: bool, params: GenerationParams = GenerationParams(),
                 tokenizer: str = "", image_processor: str = "", device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.params = params
        directory = require_checkpoint(model)
        self.retrieval: RetrievalModel | None = None
        self.runtime: VisionLanguageRuntime | None = None
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32  # CPUs lack fast half precision
        if retrieval:
            self.retrieval = load_retrieval(directory, tokenizer, image_processor)
            self.retrieval.model.to(self.device, dtype).eval()
            self._dtype = dtype
        else:
            # The prompt arrives whole (the task's template already applied): the runtime adds nothing.
            self.runtime = VisionLanguageRuntime(load_bundle(directory, dtype),
                                                 settings=RuntimeSettings(answer_prompt="{instruction}"),
                                                 device=self.device)

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str | None]) -> list[str]:
        """One caption or answer per image; ``prompts[i]`` None captions with the model's default."""
        if self.runtime is None:
            raise ValueError("this predictor holds a retrieval model; captions and answers need a generative one")
        requests = [GenerationRequest(image, prompt or None, self.params) for image, prompt in zip(images, prompts)]
        return [result.text for result in self.runtime.generate(requests)]

    def _retrieval(self) -> RetrievalModel:
        if self.retrieval is None:
            raise ValueError("this predictor holds a generative model; retrieval needs a stage-1 / retrieval one")
        return self.retrieval

    def _image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        retrieval = self._retrieval()
        pixels = retrieval.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return retrieval.model.encode_images(pixels.to(self.device, self._dtype))  # (B, P, D_vision)

    def _text_inputs(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        retrieval = self._retrieval()
        length = retrieval.model.config.qformer_config.max_position_embeddings
        encoded = retrieval.tokenizer(list(texts), padding=True, truncation=True, max_length=min(length, 64),
                                      return_tensors="pt")
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Normalised ITC features of each image's queries, (B, Q, D) float32."""
        return self._retrieval().model.image_features(self._image_embeds(images)).float().cpu().numpy()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised ITC features of each text, (B, D) float32."""
        return self._retrieval().model.text_features(*self._text_inputs(texts)).float().cpu().numpy()

    @torch.no_grad()
    def itm_logits(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]],
                   batch_size: int = 64) -> list[list[float]]:
        """ITM match-minus-no-match logit of ``images[i]`` with each text of ``texts[i]``: the images are
        encoded together, once, and every (image, text) pair is scored in batches of ``batch_size`` pairs
        across images (one image at a time ran the image encoder and the Q-Former on a handful of pairs)."""
        model = self._retrieval().model
        image_embeds = self._image_embeds(images)  # (B, P, D_vision)
        pairs = [(i, text) for i, candidates in enumerate(texts) for text in candidates]
        flat: list[float] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            ids, mask = self._text_inputs([text for _, text in chunk])
            which = torch.tensor([i for i, _ in chunk], device=self.device)
            pair = model.itm_logits(image_embeds[which], ids, mask).float()  # (b, 2)
            flat += (pair[:, 1] - pair[:, 0]).tolist()
        ends = np.cumsum([len(candidates) for candidates in texts]).tolist()
        return [flat[end - len(candidates) : end] for end, candidates in zip(ends, texts)]


def itc_similarity(image_features: np.ndarray, text_features: np.ndarray, chunk: int = 1024) -> torch.Tensor:
    """(I, T) cosine similarity, the max over each image's queries: (I, Q, D) x (T, D)."""
    images = torch.from_numpy(image_features)
    texts = torch.from_numpy(text_features)
    return torch.cat([Blip2QFormerForPretraining.itc_similarity(images[s : s + chunk], texts)
                      for s in range(0, len(images), chunk)])

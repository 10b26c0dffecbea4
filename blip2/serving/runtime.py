"""One object that answers every serving request on a batch: what a Serve replica holds, and what the
benchmark calls in-process as its baseline.

:class:`VisionLanguageRuntime` wraps a generative :class:`~blip2.models.export.ModelBundle` (BLIP-2 or
InstructBLIP) and, optionally, a stage-1 model for matching and embeddings. ``generate`` takes captions
and answers mixed, groups them by decoding parameters and runs each group as one batch:

- InstructBLIP: the instruction enters the Q-Former beside the queries *and* is the LLM's prompt; a
  caption request uses ``caption_instruction``;
- BLIP-2: no Q-Former text; a caption has no prompt, an answer is prompted with ``answer_prompt``;
- a chat conversation's earlier turns come before that prompt (:mod:`blip2.serving.conversation`); the
  InstructBLIP Q-Former still reads only the last question.

:func:`load_runtime` builds one from sources: a preset name (``toy-instruct-opt``, ...) or a
transformers directory (what ``export_blip2`` / ``export_instructblip`` write, or Salesforce's) for the
generative model, through the same :func:`~blip2.models.export.import_pretrained`; and ``toy-stage1``
or a stage-1 export directory (``export_stage1``, read by ``import_stage1``) for retrieval.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from blip2.backbones.build import find_backbones
from blip2.models.export import ModelBundle, import_pretrained, import_stage1
from blip2.models.generation import GenerationParams, decode, generate_ids
from blip2.models.instruct import encode_qformer_instructions, instruction_aware
from blip2.models.presets import load_preset, preset_names
from blip2.models.qformer import Blip2QFormerForPretraining
from blip2.models.scoring import itc_similarity, itm_probability
from blip2.models.stage1 import build_stage1_model
from blip2.models.stage2 import encode_with_left_truncation, unwrap
from blip2.serving.conversation import render_prompt
from blip2.serving.requests import EmbedRequest, GenerationRequest, MatchRequest
from blip2.serving.results import EmbedResult, GenerationResult, MatchResult, RuntimeSettings

TOY_STAGE1 = "toy-stage1"  # a freshly built (untrained, seeded) stage-1 model over the toy backbones


@dataclass
class RetrievalModel:
    """A stage-1 model with what feeds it."""

    model: Blip2QFormerForPretraining
    tokenizer: PreTrainedTokenizerBase  # the Q-Former's
    image_processor: BaseImageProcessor


class VisionLanguageRuntime:
    """Batched caption / answer / match / embed over one loaded model (see the module docstring).

    Thread-safe: model calls are serialised by a lock (a health check may run beside a batch)."""

    def __init__(self, bundle: ModelBundle, retrieval: RetrievalModel | None = None,
                 settings: RuntimeSettings = RuntimeSettings(), device: str | torch.device = "cpu") -> None:
        self.bundle = bundle
        self.retrieval = retrieval
        self.settings = settings
        self.device = torch.device(device)
        bundle.model.to(self.device).eval()
        if retrieval is not None:
            retrieval.model.to(self.device).eval()
        self.lock = threading.Lock()
        config = unwrap(bundle.model).config
        self._num_query_tokens = config.num_query_tokens
        text_config = config.text_config
        # Decoder-only LLMs read queries + prompt + new tokens in one window of positions.
        self._llm_positions = None if text_config.is_encoder_decoder else text_config.max_position_embeddings
        self.qformer_length = min(settings.max_text_length, config.qformer_config.max_position_embeddings)

    @property
    def is_instruct(self) -> bool:
        return self.bundle.is_instruct

    def max_new_tokens_supported(self) -> int:
        """The most new tokens a request may ask for and still leave 4 prompt tokens in the LLM's window."""
        if self._llm_positions is None:
            return 1 << 16
        return self._llm_positions - self._num_query_tokens - 4

    # -- generation ---------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Captions and answers, in request order; requests with equal parameters share one batch."""
        groups: dict[tuple[GenerationParams, int | None], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.params, request.seed), []).append(index)
        results: list[GenerationResult | None] = [None] * len(requests)
        for (params, seed), indices in groups.items():
            group = [requests[i] for i in indices]
            for index, result in zip(indices, self._generate_group(group, params, seed), strict=True):
                results[index] = result
        return results  # type: ignore[return-value]

    def _turn_prompt(self, instruction: str | None) -> str:
        """The LLM prompt of one question (or of a caption, ``None``)."""
        if self.is_instruct:
            return instruction or self.settings.caption_instruction
        return "" if instruction is None else self.settings.answer_prompt.format(instruction=instruction)

    def prompts(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """The LLM's prompts: a chat conversation's earlier turns, then the question (``render_prompt``)."""
        return [render_prompt(r.history, r.instruction, self._turn_prompt) for r in requests]

    def qformer_texts(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """InstructBLIP's Q-Former reads the question alone, never the conversation before it."""
        return [r.instruction or self.settings.caption_instruction for r in requests]

    def max_text_length(self, params: GenerationParams) -> int:
        """The most prompt tokens that leave room for ``params.max_new_tokens`` in the LLM's window."""
        if self._llm_positions is None:
            return self.settings.max_text_length
        budget = self._llm_positions - self._num_query_tokens - params.max_new_tokens
        if budget < 2:
            raise ValueError(f"max_new_tokens {params.max_new_tokens} leaves no room for the prompt in the LLM's "
                             f"{self._llm_positions} positions")
        return min(self.settings.max_text_length, budget)

    def _generate_group(self, requests: Sequence[GenerationRequest], params: GenerationParams,
                        seed: int | None) -> list[GenerationResult]:
        tokenizer = self.bundle.tokenizer
        prompts = self.prompts(requests)
        max_text_length = self.max_text_length(params)
        qformer_ids = qformer_mask = None
        with self.lock, torch.no_grad():
            pixel_values = self._pixels(self.bundle.image_processor, [r.image for r in requests])
            if self.is_instruct:
                qformer_ids, qformer_mask = encode_qformer_instructions(
                    self.bundle.qformer_tokenizer, self.qformer_texts(requests), self.qformer_length,
                    instruction_aware(self.bundle.model.config))
            ids = generate_ids(self.bundle.model, tokenizer, pixel_values, prompts, params, seed, max_text_length,
                               qformer_ids, qformer_mask).cpu()  # (B, L)
        texts = decode(tokenizer, ids)
        prompt_lengths = [len(p) for p in encode_with_left_truncation(tokenizer, prompts, max_text_length)]
        results = []
        for text, row, prompt_length in zip(texts, ids.tolist(), prompt_lengths, strict=True):
            # Decoder-only output pads after the end; encoder-decoder output starts with the decoder start.
            tokens = [t for t in row if t != tokenizer.pad_token_id]
            stopped = tokenizer.eos_token_id in tokens
            if stopped:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
            results.append(GenerationResult(text, self._num_query_tokens + prompt_length, len(tokens),
                                            "stop" if stopped else "length"))
        return results

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The generative model's pixel_values, (B, 3, H, W) on its device."""
        return self._pixels(self.bundle.image_processor, images)

    def _pixels(self, image_processor: BaseImageProcessor, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 3, H, W) on the model's device."""
        return image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)

    # -- matching and embeddings --------------------------------------------------------------------

    def _require_retrieval(self) -> RetrievalModel:
        if self.retrieval is None:
            raise LookupError("no retrieval (stage-1) model is loaded: set model.retrieval in the serving config")
        return self.retrieval

    def _encode_texts(self, retrieval: RetrievalModel, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        length = retrieval.model.config.qformer_config.max_position_embeddings
        encoded = retrieval.tokenizer(list(texts), padding=True, truncation=True, max_length=length,
                                      return_tensors="pt")
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def match(self, requests: Sequence[MatchRequest]) -> list[MatchResult]:
        """ITM probability and ITC similarity of each (image, text) pair."""
        retrieval = self._require_retrieval()
        with self.lock, torch.no_grad():
            image_embeds = retrieval.model.encode_images(
                self._pixels(retrieval.image_processor, [r.image for r in requests]))  # (B, N, D)
            input_ids, attention_mask = self._encode_texts(retrieval, [r.text for r in requests])
            probability = itm_probability(retrieval.model, image_embeds, input_ids, attention_mask)  # (B,)
            similarity = itc_similarity(retrieval.model, image_embeds, input_ids, attention_mask).diagonal()
        return [MatchResult(float(p), float(s)) for p, s in zip(probability.tolist(), similarity.tolist(), strict=True)]

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult]:
        """ITC-space embeddings: an image's per-query features and/or a text's feature."""
        retrieval = self._require_retrieval()
        image_rows = [i for i, r in enumerate(requests) if r.image is not None]
        text_rows = [i for i, r in enumerate(requests) if r.text is not None]
        image_features: dict[int, list[list[float]]] = {}
        text_features: dict[int, list[float]] = {}
        with self.lock, torch.no_grad():
            if image_rows:
                embeds = retrieval.model.encode_images(
                    self._pixels(retrieval.image_processor, [requests[i].image for i in image_rows]))
                image_features = dict(zip(image_rows, retrieval.model.image_features(embeds).cpu().tolist(), strict=True))
            if text_rows:
                ids, mask = self._encode_texts(retrieval, [requests[i].text for i in text_rows])
                text_features = dict(zip(text_rows, retrieval.model.text_features(ids, mask).cpu().tolist(), strict=True))
        return [EmbedResult(image_features.get(i), text_features.get(i)) for i in range(len(requests))]

    # -- health -------------------------------------------------------------------------------------

    def health_check(self) -> None:
        """Run every loaded model on a tiny input; raise if anything fails or comes out non-finite."""
        image = Image.new("RGB", (32, 32), (127, 127, 127))
        result = self.generate([GenerationRequest(image, None, GenerationParams(max_new_tokens=1))])[0]
        if result.completion_tokens < 0 or not isinstance(result.text, str):
            raise RuntimeError("the generative model returned no tokens")
        if self.retrieval is not None:
            match = self.match([MatchRequest(image, "health check")])[0]
            if not (0.0 <= match.itm_probability <= 1.0 and -1.0 <= match.itc_similarity <= 1.0 + 1e-5):
                raise RuntimeError(f"the retrieval model returned out-of-range scores: {match}")


# ---------------------------------------------------------------------------------------------------
# Loading


def load_bundle(source: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> ModelBundle:
    """A preset name or a transformers BLIP-2 / InstructBLIP directory."""
    if source in preset_names():
        return load_preset(source, dtype=dtype, seed=seed)
    if Path(source).is_dir():
        return import_pretrained(source, dtype=dtype)
    raise ValueError(f"model source {source!r} is neither a preset ({', '.join(preset_names())}) nor a directory")


def load_retrieval(source: str, tokenizer: str = "", image_processor: str = "",
                   fallback: ModelBundle | None = None, seed: int = 0) -> RetrievalModel:
    """``toy-stage1`` or a stage-1 export directory, with the Q-Former tokenizer and image processor.

    A stage-1 export holds neither: they come from ``tokenizer`` / ``image_processor`` when given, else
    from the directory if it has them, else from ``fallback`` (the generative model's Q-Former tokenizer
    and image processor, which a model trained on from the same stage 1 shares)."""
    if source == TOY_STAGE1:
        backbones = find_backbones()
        torch.manual_seed(seed)
        model = build_stage1_model(backbones.vision, backbones.qformer_tokenizer)
        tokenizer = tokenizer or str(backbones.qformer_tokenizer)
        image_processor = image_processor or str(backbones.vision)
        return RetrievalModel(model.eval(), AutoTokenizer.from_pretrained(tokenizer),
                              AutoImageProcessor.from_pretrained(image_processor))
    path = Path(source)
    if not path.is_dir():
        raise ValueError(f"retrieval source {source!r} is neither {TOY_STAGE1!r} nor a directory")
    model = import_stage1(path).eval()
    if tokenizer or (path / "tokenizer_config.json").exists():
        text_tokenizer = AutoTokenizer.from_pretrained(tokenizer or path)
    elif fallback is not None and fallback.qformer_tokenizer is not None:
        text_tokenizer = fallback.qformer_tokenizer
    else:
        raise ValueError(f"{source}: no Q-Former tokenizer; set the retrieval tokenizer in the config")
    if image_processor or (path / "preprocessor_config.json").exists():
        processor = AutoImageProcessor.from_pretrained(image_processor or path)
    elif fallback is not None:
        processor = fallback.image_processor
    else:
        raise ValueError(f"{source}: no image processor; set the retrieval image processor in the config")
    # Fewer tokens than embedding rows is normal: Salesforce's Q-Former has a row for the [DEC] token its
    # published BERT tokenizer lacks. More would index past the embeddings.
    if len(text_tokenizer) > model.config.qformer_config.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {len(text_tokenizer)} tokens, the Q-Former only "
                         f"{model.config.qformer_config.vocab_size}: they do not belong together")
    return RetrievalModel(model, text_tokenizer, processor)


def load_runtime(model: str, retrieval: str = "", retrieval_tokenizer: str = "", retrieval_image_processor: str = "",
                 settings: RuntimeSettings = RuntimeSettings(), device: str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> VisionLanguageRuntime:
    """A runtime from sources (see the module docstring); ``retrieval`` empty: no /match, /embed."""
    bundle = load_bundle(model, dtype, seed)
    stage1 = load_retrieval(retrieval, retrieval_tokenizer, retrieval_image_processor, bundle, seed) if retrieval else None
    return VisionLanguageRuntime(bundle, stage1, settings, device)

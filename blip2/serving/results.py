"""What the serving runtime returns, and its settings: plain dataclasses, apart from the runtime and its
torch, so that the HTTP ingress (``pipelines/serve.py``'s ``Gateway``, a replica of its own) handles them
without importing torch or transformers (``tests/blip2/test_light_imports.py``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeSettings:
    caption_instruction: str = "write a short caption for this image."  # InstructBLIP caption requests
    answer_prompt: str = "Question: {instruction} Answer:"  # BLIP-2 answer requests
    max_text_length: int = 128  # tokens of a prompt / Q-Former text; longer ones lose their beginning

    def __post_init__(self) -> None:
        if "{instruction}" not in self.answer_prompt:
            raise ValueError("answer_prompt must contain '{instruction}'")
        if self.max_text_length < 4:
            raise ValueError("max_text_length must be >= 4")


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int  # query tokens + prompt tokens the LLM read
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (max_new_tokens reached)


@dataclass(frozen=True)
class MatchResult:
    itm_probability: float  # P(match) from the ITM head, in [0, 1]
    itc_similarity: float  # cosine similarity (max over queries), in [-1, 1]


@dataclass(frozen=True)
class EmbedResult:
    image_embedding: list[list[float]] | None  # (Q, D) normalised ITC features, one per query
    text_embedding: list[float] | None  # (D,) normalised ITC feature of the text's [CLS]


@dataclass(frozen=True)
class TokenEvent:
    """What one step produced for one request: ``text`` is new text since its previous event (may be
    empty: a token can complete no character); ``result`` is set on its last event."""

    request_id: int
    text: str
    result: GenerationResult | None = None

"""Decoding parameters: a plain dataclass, kept apart from :mod:`blip2.models.generation` (which needs torch
and transformers) so that the typed configs that name it (training, CapFilt, evaluation, serving) parse
without importing either."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters (the subset of ``transformers.GenerationConfig`` that BLIP-2 uses).

    Greedy: the defaults. Beam search: ``num_beams > 1``. Nucleus sampling: ``do_sample=True`` with
    ``top_p`` < 1 and/or a ``temperature``; CapFilt draws ``num_return_sequences`` captions per image.
    """

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    length_penalty: float = 1.0  # beam search: scores divided by length ** length_penalty (< 0 favours short)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("beam sampling is not supported: use do_sample=True with num_beams=1, or beam search")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams}) without sampling: greedy and beam search are deterministic")
        if not self.do_sample and (self.top_p != 1.0 or self.temperature != 1.0):
            raise ValueError("top_p and temperature only apply with do_sample=True")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``generate``; sampling-only ones only when sampling (transformers warns
        about, and some versions reject, ``top_p`` / ``temperature`` in greedy or beam search)."""
        kwargs = asdict(self)
        if not self.do_sample:
            del kwargs["top_p"], kwargs["temperature"]
        if self.num_beams == 1:  # only beam search reads it
            del kwargs["length_penalty"]
        return kwargs


GREEDY = GenerationParams()
BEAM_SEARCH = GenerationParams(num_beams=5)
NUCLEUS = GenerationParams(do_sample=True, top_p=0.9)

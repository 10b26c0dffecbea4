"""Which captions of an image survive: those the filter scores at or above the threshold, best first,
at most ``top_n`` (BLIP-2 keeps the top two of its synthetic and web captions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WEB, SYNTHETIC = "web", "synthetic"


@dataclass(frozen=True)
class Selection:
    captions: list[str]  # best first
    sources: list[str]  # WEB or SYNTHETIC, aligned with captions
    scores: list[float]
    best_score: float | None  # the best candidate's score, kept or not (None: no candidate at all)

    @property
    def kept(self) -> bool:
        return bool(self.captions)


def normalise(text: str) -> str:
    """The form in which two captions count as the same: lower case, single spaces."""
    return " ".join(text.lower().split())


def candidates(web_text: str | None, synthetic: Sequence[str]) -> tuple[list[str], list[str]]:
    """The distinct captions to score and their sources: the web caption first, then each synthetic
    caption not already present (sampling repeats itself; a synthetic copy of the alt-text is the alt-text)."""
    texts, sources, seen = [], [], set()
    for text, source in [(web_text, WEB)] + [(s, SYNTHETIC) for s in synthetic]:
        if not text or normalise(text) in seen:
            continue
        seen.add(normalise(text))
        texts.append(text)
        sources.append(source)
    return texts, sources


def select_captions(texts: Sequence[str], sources: Sequence[str], scores: Sequence[float], threshold: float,
                    top_n: int) -> Selection:
    """Keep candidates with score >= ``threshold``, best first (ties: earlier candidate, so the web
    caption wins a tie), at most ``top_n``."""
    if not len(texts) == len(sources) == len(scores):
        raise ValueError(f"{len(texts)} texts, {len(sources)} sources, {len(scores)} scores")
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))
    passed = [i for i in order if scores[i] >= threshold][:top_n]
    return Selection([texts[i] for i in passed], [sources[i] for i in passed], [float(scores[i]) for i in passed],
                     float(scores[order[0]]) if order else None)

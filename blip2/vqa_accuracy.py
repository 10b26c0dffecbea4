"""Answer accuracy as the official VQA evaluation script defines it, and GQA's exact match.

**VQA accuracy** (Antol et al. 2015; VQAv2, OK-VQA): a question has ten human answers. For each of the
ten ways to leave one human out, the prediction scores ``min(#remaining humans who gave it / 3, 1)``;
the question's accuracy is the mean of those ten scores. So an answer three or more humans gave scores
1 (0.9 when exactly three did: leaving one of them out drops it to 2/3 in three of ten subsets).

Normalisation, as the official script applies it:

- newlines and tabs become spaces and the answer is stripped, always;
- only when the humans disagree (more than one distinct answer string) are the prediction and the
  human answers also normalised: punctuation is removed (or turned into a space, see
  :func:`normalise_punctuation`), periods not followed by a digit are dropped, the text is lower-cased,
  number words become digits (``"two"`` -> ``"2"``), articles (a, an, the) are dropped and
  apostrophe-less contractions get their apostrophe (``"dont"`` -> ``"don't"``);
- the comparison ignores case.

The second rule is the official script's, kept so numbers compare with published ones: when all ten
humans agree, ``"two"`` does not match ``"2"``. The toy world's answers are single lower-case words
that all ten annotators give, so there VQA accuracy is exact match after stripping and lower-casing.

**GQA accuracy** (Hudson & Manning 2019): one answer per question; the prediction scores 1 when it
equals the answer after the same normalisation (always applied; LAVIS scores GQA this way), else 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("2.5" keeps its point)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_MAX_PERIODS_DROPPED = 32  # the official script passes re.UNICODE (= 32) as sub()'s count by mistake

# Contractions as the official script spells them: each key is its value with one apostrophe left out
# ("dont" -> "don't"; "couldnt've" and "couldn'tve" -> "couldn't've"). The script's capitalised keys
# ("Im", "Ive", "Id've") can never match its lower-cased words and are left out.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've shouldn't shouldn't've "
    "should've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        for i, character in enumerate(word):
            if character == "'":
                table[word[:i] + word[i + 1:]] = word
    table["somebody'd"] = "somebodyd"  # the official table maps this one backwards; kept for equal scores
    return table


CONTRACTIONS: dict[str, str] = _contraction_table()


def normalise_punctuation(text: str) -> str:
    """The official punctuation rule: each mark in the list is deleted when it touches a space (or the
    text has a digit-comma-digit, "1,000"), else replaced by a space ("black/white" -> "black white");
    then periods not followed by a digit are deleted (at most 32, as the official script does)."""
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_DROPPED)


def normalise_words(text: str) -> str:
    """Lower-case, number words to digits, articles dropped, contractions restored, single spaces."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalise_vqa_answer(text: str) -> str:
    """The full official normalisation of one answer (see the module docstring)."""
    return normalise_words(normalise_punctuation(_clean(text)))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the human ``answers`` (usually ten), in [0, 1]."""
    if len(answers) == 0:
        raise ValueError("VQA accuracy needs the human answers; this question has none")
    humans = [_clean(a) for a in answers]
    predicted = _clean(prediction)
    if len(set(humans)) > 1:
        humans = [normalise_vqa_answer(a) for a in humans]
        predicted = normalise_vqa_answer(predicted)
    matches = [a.lower() == predicted.lower() for a in humans]
    total = sum(matches)
    # Leaving out human i leaves total - matches[i] matching humans among the other nine.
    return float(np.mean([min(1.0, (total - m) / 3) for m in matches]))


def gqa_accuracy(prediction: str, answer: str) -> float:
    """1.0 when ``prediction`` equals GQA's ``answer`` after :func:`normalise_vqa_answer`, else 0.0."""
    return float(normalise_vqa_answer(prediction) == normalise_vqa_answer(answer))


def mean_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]], single: bool = False) -> float:
    """Mean :func:`vqa_accuracy` (or :func:`gqa_accuracy` against ``answers[i][0]`` when ``single``)."""
    if len(predictions) == 0 or len(predictions) != len(answers):
        raise ValueError(f"need one prediction per question, got {len(predictions)} and {len(answers)}")
    if single:
        return float(np.mean([gqa_accuracy(p, a[0]) for p, a in zip(predictions, answers)]))
    return float(np.mean([vqa_accuracy(p, a) for p, a in zip(predictions, answers)]))

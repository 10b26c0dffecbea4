"""Instruction-tuning sets in their published formats: A-OKVQA and LLaVA-Instruct.

Published layouts read here:

- **A-OKVQA** ``aokvqa_v1p0_<split>.json``: a list of ``{"split", "image_id", "question_id", "question",
  "choices": [4 strings], "correct_choice_idx", "direct_answers": [10 strings], "difficult_direct_answer",
  "rationales": [3 strings]}``. The images are COCO 2017's (``<coco>/<split>2017/<image_id:012d>.jpg``).
  The test split has no ``correct_choice_idx``, ``direct_answers`` or ``rationales``: those are read as
  unknown (-1) and empty.
- **LLaVA-Instruct** ``llava_instruct_150k.json`` (also ``complex_reasoning_77k.json``,
  ``conversation_58k.json``, ``detail_23k.json``): a list of ``{"id", "image": "000000033471.jpg",
  "conversations": [{"from": "human", "value": "<image>\\nWhat ..."}, {"from": "gpt", "value": "..."},
  ...]}``, the image named relative to COCO ``train2017/``. Turns alternate human, gpt; the ``<image>``
  marker (first human turn, before or after the text) says where the image goes, and is removed here: the
  model always sees the image first.

Like the other loaders these read local files only; a file that breaks its format is a
:class:`DatasetError` naming the entry and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blip2.datasets.errors import DatasetError, field, read_json, require_dir

AOKVQA_WHAT = "an A-OKVQA JSON (e.g. aokvqa_v1p0_train.json: a list of questions with choices and rationales)"
LLAVA_WHAT = "a LLaVA-Instruct JSON (e.g. llava_instruct_150k.json: a list of image, conversations)"
IMAGE_MARKER = "<image>"
HUMAN, GPT = "human", "gpt"


@dataclass(frozen=True)
class ChoiceQuestion:
    """One A-OKVQA question: four choices (``correct`` indexes the right one, -1 when not public), ten
    direct answers and the annotators' rationales."""

    question_id: str
    image_id: str
    path: Path
    question: str
    choices: tuple[str, ...]
    correct: int
    direct_answers: tuple[str, ...]
    rationales: tuple[str, ...] = ()
    difficult: bool = False


@dataclass(frozen=True)
class Conversation:
    """One LLaVA-Instruct conversation about one image: ``turns`` are (human, gpt) pairs in order."""

    conversation_id: str
    path: Path
    turns: tuple[tuple[str, str], ...]


def _missing_images(paths: list[Path], image_dir: Path, source: Path) -> None:
    missing = sorted({str(p) for p in paths if not p.is_file()})
    if missing:
        raise DatasetError(f"{len(missing)} images that {source.name} names are missing under {image_dir} "
                           f"(e.g. {missing[0]}): put them there (nothing is downloaded)")


def _strings(value: object, path: Path, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DatasetError(f"{path}: {where} must be a list of strings, got {value!r}")
    return tuple(v.strip() for v in value)


def aokvqa_image_path(image_dir: Path, image_id: str) -> Path:
    """COCO 2017's file name of ``image_id`` (``000000299207.jpg``) under ``image_dir``."""
    return image_dir / (f"{int(image_id):012d}.jpg" if image_id.isdigit() else f"{image_id}.jpg")


def load_aokvqa(annotations: str | Path, image_dir: str | Path) -> list[ChoiceQuestion]:
    """A-OKVQA questions in the file's order. ``image_dir`` is the split's COCO 2017 folder (``train2017``
    for train, ``val2017`` for val, ``test2017`` for test)."""
    path = Path(annotations)
    data = read_json(path, AOKVQA_WHAT)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected {AOKVQA_WHAT}; found a {type(data).__name__}")
    image_dir = require_dir(image_dir, f"the COCO 2017 images that {path.name} asks about")
    result, seen = [], set()
    for index, entry in enumerate(data):
        where = f"entry {index}"
        question_id = str(field(entry, "question_id", path, where))
        if question_id in seen:
            raise DatasetError(f"{path}: question {question_id} is listed twice")
        seen.add(question_id)
        image_id = str(field(entry, "image_id", path, where))
        choices = _strings(field(entry, "choices", path, where), path, f"{where}'s choices")
        if len(choices) < 2:
            raise DatasetError(f"{path}: {where} has {len(choices)} choice(s); a multiple-choice question needs two or more")
        correct = entry.get("correct_choice_idx")
        correct = -1 if correct is None else correct
        if not isinstance(correct, int) or isinstance(correct, bool) or not -1 <= correct < len(choices):
            raise DatasetError(f"{path}: {where}'s correct_choice_idx {correct!r} is not an index into its "
                               f"{len(choices)} choices")
        direct = _strings(entry.get("direct_answers") or [], path, f"{where}'s direct_answers")
        rationales = _strings(entry.get("rationales") or [], path, f"{where}'s rationales")
        result.append(ChoiceQuestion(question_id, image_id, aokvqa_image_path(image_dir, image_id),
                                     str(field(entry, "question", path, where)).strip(), choices, correct,
                                     direct, rationales, bool(entry.get("difficult_direct_answer", False))))
    if not result:
        raise DatasetError(f"{path} holds no questions")
    _missing_images([q.path for q in result], image_dir, path)
    return result


def _turn_text(turn: object, expected: str, path: Path, where: str) -> str:
    speaker = field(turn, "from", path, where)
    value = field(turn, "value", path, where)
    if speaker != expected:
        raise DatasetError(f"{path}: {where} is from {speaker!r}, expected {expected!r} (turns alternate "
                           f"{HUMAN!r} and {GPT!r}, starting with {HUMAN!r})")
    if not isinstance(value, str) or not value.replace(IMAGE_MARKER, "").strip():
        raise DatasetError(f"{path}: {where} has no text")
    return value


def strip_image_marker(text: str) -> str:
    """The turn's text without ``<image>`` and the newline that joins it (``"<image>\\nWhat ..."`` and
    ``"What ...\\n<image>"`` both give ``"What ..."``)."""
    return " ".join(part.strip() for part in text.split(IMAGE_MARKER) if part.strip())


def load_llava(annotations: str | Path, image_dir: str | Path) -> list[Conversation]:
    """LLaVA-Instruct conversations in the file's order. ``image_dir`` is the folder the entries' ``image``
    names are relative to (COCO ``train2017/``). A conversation must alternate human and gpt turns and
    end with gpt's; an entry without an image (LLaVA's text-only mixtures have such) is an error here."""
    path = Path(annotations)
    data = read_json(path, LLAVA_WHAT)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected {LLAVA_WHAT}; found a {type(data).__name__}")
    image_dir = require_dir(image_dir, f"the images that {path.name} names (COCO train2017/)")
    result = []
    for index, entry in enumerate(data):
        where = f"entry {index}"
        if isinstance(entry, dict) and "image" not in entry:
            raise DatasetError(f"{path}: {where} (id {entry.get('id')!r}) has no image; a text-only conversation "
                               f"cannot be an image instruction")
        image = str(field(entry, "image", path, where))
        turns = field(entry, "conversations", path, where)
        if not isinstance(turns, list) or not turns:
            raise DatasetError(f"{path}: {where} has no conversation turns")
        if len(turns) % 2:
            raise DatasetError(f"{path}: {where} has {len(turns)} turns; the last human turn has no gpt answer")
        pairs = tuple((strip_image_marker(_turn_text(turns[i], HUMAN, path, f"{where} turn {i}")),
                       _turn_text(turns[i + 1], GPT, path, f"{where} turn {i + 1}").strip())
                      for i in range(0, len(turns), 2))
        result.append(Conversation(str(entry.get("id", image)), image_dir / image, pairs))
    if not result:
        raise DatasetError(f"{path} holds no conversations")
    _missing_images([c.path for c in result], image_dir, path)
    return result

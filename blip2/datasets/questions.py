"""Visual questions: VQAv2 and OK-VQA (questions + annotations JSON), GQA (balanced questions JSON).

Published layouts read here:

- **VQAv2** ``v2_OpenEnded_mscoco_<subtype>_questions.json``: ``{"data_subtype": "val2014", "questions":
  [{"image_id", "question", "question_id"}]}`` and ``v2_mscoco_<subtype>_annotations.json``:
  ``{"annotations": [{"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
  "answers": [{"answer", "answer_confidence", "answer_id"}] * 10}]}``. Images are COCO's,
  ``COCO_<subtype>_<image_id:012d>.jpg`` (2014 names) or ``<image_id:012d>.jpg`` (2017 names).
- **OK-VQA** ``OpenEnded_mscoco_val2014_questions.json`` + ``mscoco_val2014_annotations.json``: the same
  format (its ten answers are five annotators' answers, each twice).
- **GQA** ``testdev_balanced_questions.json`` (or ``val_…``): ``{"<question id>": {"imageId", "question",
  "answer", "fullAnswer", "types": {...}, ...}}``; images are ``<imageId>.jpg``.

Answers are kept exactly as annotated: the metrics normalise them as the official scripts do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blip2.datasets.errors import DatasetError, field, read_json, require_dir

VQA_QUESTIONS_WHAT = ("a VQA questions JSON (e.g. v2_OpenEnded_mscoco_val2014_questions.json, or OK-VQA's "
                      "OpenEnded_mscoco_val2014_questions.json)")
VQA_ANNOTATIONS_WHAT = ("the matching VQA annotations JSON (e.g. v2_mscoco_val2014_annotations.json, or OK-VQA's "
                        "mscoco_val2014_annotations.json)")
GQA_WHAT = "a GQA balanced questions JSON (e.g. testdev_balanced_questions.json)"


@dataclass(frozen=True)
class VisualQuestion:
    """One question about one image, with the human answers (ten for VQAv2 / OK-VQA, one for GQA)."""

    question_id: str
    image_id: str
    path: Path
    question: str
    answers: tuple[str, ...]  # as annotated; empty when the split's answers are not public
    answer_type: str = ""  # VQA: "yes/no", "number", "other"
    question_type: str = ""  # VQA: "what color is the", ...; GQA: the structural type ("query", "verify", ...)


def coco_image_path(image_dir: Path, image_id: str, subtype: str) -> Path:
    """The file of COCO image ``image_id``: the 2014 name ``COCO_<subtype>_<id:012d>.jpg`` or, if only
    that exists, the 2017 name ``<id:012d>.jpg``."""
    number = int(image_id) if image_id.isdigit() else None
    names = ([f"COCO_{subtype}_{number:012d}.jpg", f"{number:012d}.jpg"] if number is not None
             else [f"COCO_{subtype}_{image_id}.jpg", f"{image_id}.jpg"])
    for name in names:
        if (image_dir / name).is_file():
            return image_dir / name
    return image_dir / names[0]


def _check_paths(questions: list[VisualQuestion], image_dir: Path, source: Path) -> None:
    missing = sorted({str(q.path) for q in questions if not q.path.is_file()})
    if missing:
        raise DatasetError(f"{len(missing)} images that {source.name} asks about are missing under {image_dir} "
                           f"(e.g. {missing[0]}): put them there (nothing is downloaded)")


def load_vqa(questions: str | Path, annotations: str | Path | None, image_dir: str | Path) -> list[VisualQuestion]:
    """VQAv2 / OK-VQA questions in the questions file's order, each with its annotated answers.

    ``annotations`` None (or empty) reads questions only (test-dev, whose answers are not public); else
    every question must have an annotation and every annotation a question.
    """
    questions_path = Path(questions)
    data = read_json(questions_path, VQA_QUESTIONS_WHAT)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise DatasetError(f"{questions_path}: expected {VQA_QUESTIONS_WHAT}; found no 'questions' list")
    subtype = str(data.get("data_subtype", ""))
    image_dir = require_dir(image_dir, f"the COCO images ({subtype or 'val2014'}) that {questions_path.name} asks about")
    by_question: dict[str, dict] = {}
    if annotations:
        annotations_path = Path(annotations)
        annotation_data = read_json(annotations_path, VQA_ANNOTATIONS_WHAT)
        if not isinstance(annotation_data, dict) or not isinstance(annotation_data.get("annotations"), list):
            raise DatasetError(f"{annotations_path}: expected {VQA_ANNOTATIONS_WHAT}; found no 'annotations' list")
        for index, entry in enumerate(annotation_data["annotations"]):
            by_question[str(field(entry, "question_id", annotations_path, f"annotations[{index}]"))] = entry
    result = []
    for index, entry in enumerate(data["questions"]):
        where = f"questions[{index}]"
        question_id = str(field(entry, "question_id", questions_path, where))
        image_id = str(field(entry, "image_id", questions_path, where))
        annotation = by_question.pop(question_id, None) if annotations else {}
        if annotation is None:
            raise DatasetError(f"{annotations}: no annotation for question {question_id} of {questions_path.name}; "
                               f"are the two files of the same split?")
        answers = tuple(str(field(a, "answer", Path(annotations or ""), f"question {question_id}'s answers"))
                        for a in annotation.get("answers", []))
        if annotations and not answers:
            raise DatasetError(f"{annotations}: question {question_id} has no answers")
        result.append(VisualQuestion(question_id, image_id, coco_image_path(image_dir, image_id, subtype),
                                     str(field(entry, "question", questions_path, where)), answers,
                                     str(annotation.get("answer_type", "")), str(annotation.get("question_type", ""))))
    if by_question:
        raise DatasetError(f"{annotations}: {len(by_question)} annotations have no question in {questions_path.name} "
                           f"(e.g. question {next(iter(by_question))}); are the two files of the same split?")
    if not result:
        raise DatasetError(f"{questions_path} holds no questions")
    _check_paths(result, image_dir, questions_path)
    return result


def load_gqa(questions: str | Path, image_dir: str | Path) -> list[VisualQuestion]:
    """GQA balanced questions in the file's order; each has one answer (``answer``, not ``fullAnswer``)."""
    path = Path(questions)
    data = read_json(path, GQA_WHAT)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected {GQA_WHAT} (an object keyed by question id); found a {type(data).__name__}")
    image_dir = require_dir(image_dir, f"GQA's images (<imageId>.jpg) that {path.name} asks about")
    result = []
    for question_id, entry in data.items():
        where = f"question {question_id}"
        image_id = str(field(entry, "imageId", path, where))
        answer = entry.get("answer") if isinstance(entry, dict) else None
        types = entry.get("types") or {}
        result.append(VisualQuestion(str(question_id), image_id, image_dir / f"{image_id}.jpg",
                                     str(field(entry, "question", path, where)),
                                     () if answer is None else (str(answer),), "",
                                     str(types.get("structural", "")) if isinstance(types, dict) else ""))
    if not result:
        raise DatasetError(f"{path} holds no questions")
    _check_paths(result, image_dir, path)
    return result

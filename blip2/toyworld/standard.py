"""The toy world's held-out splits written in the standard sets' published formats.

So the toy numbers and a real COCO / VQAv2 / GQA number come from the same loaders and metrics
(:mod:`blip2.datasets`), ``blip2 toyworld`` also writes, under ``<out>/standard/``, for each held-out
split (``val``, ``test``, ``novel``):

- ``images/COCO_toy<split>_<id:012d>.jpg``: the split's images, named as COCO 2014 names its files (the
  VQA loader finds images by that name; GQA's ``imageId`` is the same stem);
- ``coco_karpathy_<split>.json``: LAVIS's Karpathy layout, every caption template's caption of each image
  (six references, as COCO has five), for retrieval and captioning;
- ``captions_<split>.json``: the same references in COCO captions format;
- ``v2_OpenEnded_mscoco_toy<split>_questions.json`` and ``v2_mscoco_toy<split>_annotations.json``: one
  question of each family in :data:`QUESTION_FAMILIES` per image, in VQAv2's format; the answer is one
  word that all ten annotators give, so VQA accuracy is exact match; ``question_type`` is the family;
- ``<split>_balanced_questions.json``: the same questions in GQA's format.

The toy-only ground truth (each image's attributes) stays in the WebDataset / Parquet shards; the
evaluation reports attribute-level metrics from there beside the standard ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from blip2.toyworld.selection import check_report_split
from blip2.toyworld.text import CAPTION_TEMPLATES, INSTRUCTION_TASKS, YES_NO_TASKS, caption, instruction_example

if TYPE_CHECKING:  # corpus.py writes these files, so it imports this module
    from blip2.toyworld.corpus import Record

STANDARD_DIR = "standard"
HELD_OUT_SPLITS: tuple[str, ...] = ("val", "test", "novel")
# Families with a one-word answer (``describe`` has many right phrasings: it is the captioning task).
QUESTION_FAMILIES: tuple[str, ...] = tuple(task for task in INSTRUCTION_TASKS if task != "describe")
YES_NO_FAMILIES: tuple[str, ...] = YES_NO_TASKS
NUM_ANNOTATORS = 10


def image_name(split: str, image_id: int) -> str:
    return f"COCO_toy{split}_{image_id:012d}.jpg"


def standard_files(root: str | Path, split: str) -> dict[str, Path]:
    """Where the files of ``split`` live under a toy world's ``root`` (``<root>/standard/...``); ``test``
    and ``novel`` only under an evaluation entry point (:mod:`blip2.toyworld.selection`)."""
    check_report_split(split)
    base = Path(root) / STANDARD_DIR
    return {"images": base / "images", "karpathy": base / f"coco_karpathy_{split}.json",
            "coco_captions": base / f"captions_{split}.json",
            "vqa_questions": base / f"v2_OpenEnded_mscoco_toy{split}_questions.json",
            "vqa_annotations": base / f"v2_mscoco_toy{split}_annotations.json",
            "gqa_questions": base / f"{split}_balanced_questions.json"}


def _questions(records: Sequence[Record], split: str, seed: int) -> list[dict]:
    """One question per family per image, ``question_id = image_id * 10 + family index``; every family
    draws from its own generator, so the questions do not depend on which families are written."""
    rows = []
    generators = {f: np.random.default_rng([seed, HELD_OUT_SPLITS.index(split), 1000 + i])
                  for i, f in enumerate(QUESTION_FAMILIES)}
    for image_id, record in enumerate(records):
        for index, family in enumerate(QUESTION_FAMILIES):
            example = instruction_example(family, record.attributes, generators[family])
            rows.append({"question_id": image_id * 10 + index, "image_id": image_id, "family": family,
                         "question": example.instruction, "answer": example.answer})
    return rows


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")


def write_standard_split(records: Sequence[Record], split: str, root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ``records`` (a held-out split: correct alt-texts) in the standard formats; returns the paths."""
    if split not in HELD_OUT_SPLITS:
        raise ValueError(f"only held-out splits {HELD_OUT_SPLITS} are written in standard formats, not {split!r}")
    files = standard_files(root, split)
    files["images"].mkdir(parents=True, exist_ok=True)
    references = []
    for image_id, record in enumerate(records):
        (files["images"] / image_name(split, image_id)).write_bytes(record.image)
        references.append([caption(record.attributes, t) for t in range(len(CAPTION_TEMPLATES))])
    _write_json(files["karpathy"], [{"image": image_name(split, i), "caption": refs, "image_id": f"toy{split}_{i}"}
                                    for i, refs in enumerate(references)])
    _write_json(files["coco_captions"], {
        "info": {"description": f"toy world {split} split"}, "licenses": [], "type": "captions",
        "images": [{"id": i, "file_name": image_name(split, i), "width": 0, "height": 0} for i in range(len(records))],
        "annotations": [{"id": i * len(CAPTION_TEMPLATES) + t, "image_id": i, "caption": text}
                        for i, refs in enumerate(references) for t, text in enumerate(refs)]})
    questions = _questions(records, split, seed)
    subtype = f"toy{split}"
    _write_json(files["vqa_questions"], {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype, "license": {},
        "questions": [{"image_id": q["image_id"], "question": q["question"], "question_id": q["question_id"]}
                      for q in questions]})
    _write_json(files["vqa_annotations"], {
        "info": {}, "data_type": "mscoco", "data_subtype": subtype, "license": {},
        "annotations": [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": q["family"],
                         "answer_type": "yes/no" if q["family"] in YES_NO_FAMILIES else "other",
                         "multiple_choice_answer": q["answer"],
                         "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": n + 1}
                                     for n in range(NUM_ANNOTATORS)]} for q in questions]})
    _write_json(files["gqa_questions"], {
        str(q["question_id"]): {"imageId": image_name(split, q["image_id"])[: -len(".jpg")],
                                "question": q["question"], "answer": q["answer"], "fullAnswer": q["answer"],
                                "isBalanced": True,
                                "types": {"structural": "verify" if q["family"] in YES_NO_FAMILIES else "query",
                                          "semantic": "attr", "detailed": q["family"]}}
        for q in questions})
    return files


def question_families() -> dict[str, tuple[str, ...]]:
    """The phrasings of each written family (for reports that list what was asked)."""
    return {family: INSTRUCTION_TASKS[family] for family in QUESTION_FAMILIES}

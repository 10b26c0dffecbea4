"""Tiny instruction-tuning sets in each published format, laid out as ``pipelines/configs/instruct_gpu.yaml``
expects them under its datasets root (docs/training.md, "Instruction tuning on the published datasets").

The images are toy-world images (real JPEGs) and the texts state their attributes, so a model tuned on
them has something to learn; every file follows its dataset's published format exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from blip2.toyworld.corpus import Record
from blip2.toyworld.text import caption

GPU_ROOT = "/mnt/cluster_storage/datasets"  # the root instruct_gpu.yaml names


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _image(path: Path, record: Record) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record.image)


def _vqa(root: Path, records: list[Record], subtype: str, questions_name: str, annotations_name: str) -> None:
    questions, annotations = [], []
    for image_id, r in enumerate(records, start=1):
        qid = image_id * 10
        questions.append({"image_id": image_id, "question": "what colour is the shape?", "question_id": qid})
        answers = [r.attributes.colour] * 7 + [r.attributes.shape, "Red ", "2"]  # the most common one wins
        annotations.append({"question_id": qid, "image_id": image_id, "question_type": "what color is the",
                            "answer_type": "other", "multiple_choice_answer": r.attributes.colour,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                                        for n, a in enumerate(answers)]})
    head = {"info": {}, "data_type": "mscoco", "data_subtype": subtype, "license": {}}
    _write(root / questions_name, {**head, "task_type": "Open-Ended", "questions": questions})
    _write(root / annotations_name, {**head, "annotations": annotations})


def write_instruction_files(root: str | Path, records: list[Record]) -> Path:
    """Every published format under ``root`` (the datasets root) about ``records``' images; returns ``root``."""
    root = Path(root)
    coco = root / "coco" / "images"
    for image_id, r in enumerate(records, start=1):
        _image(coco / "train2014" / f"COCO_train2014_{image_id:012d}.jpg", r)
        _image(coco / "train2017" / f"{image_id:012d}.jpg", r)
        _image(root / "gqa" / "images" / f"n{image_id}.jpg", r)
        _image(root / "nocaps" / "images" / f"{image_id:04d}.jpg", r)
    # COCO Caption, Karpathy train split as LAVIS ships it: one caption per entry, an image in several entries
    _write(root / "coco" / "annotations" / "coco_karpathy_train.json",
           [{"image": f"train2014/COCO_train2014_{i:012d}.jpg", "caption": caption(r.attributes, t),
             "image_id": f"coco_{i}"} for i, r in enumerate(records, start=1) for t in (0, 3)])
    _vqa(root / "vqav2", records, "train2014", "v2_OpenEnded_mscoco_train2014_questions.json",
         "v2_mscoco_train2014_annotations.json")
    _vqa(root / "okvqa", records, "train2014", "OpenEnded_mscoco_train2014_questions.json",
         "mscoco_train2014_annotations.json")
    _write(root / "aokvqa" / "aokvqa_v1p0_train.json", [
        {"split": "train", "image_id": i, "question_id": f"aok{i}", "question": "which shape is in the picture?",
         "choices": [r.attributes.shape, "banana", "violin", "tractor"][::-1], "correct_choice_idx": 3,
         "direct_answers": [r.attributes.shape] * 10, "difficult_direct_answer": False,
         "rationales": [f"the picture shows a {r.attributes.shape}."] * 3}
        for i, r in enumerate(records, start=1)])
    _write(root / "llava" / "llava_instruct_150k.json", [
        {"id": f"{i:012d}", "image": f"{i:012d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\ndescribe the image." if i % 2 else "what do you see?\n<image>"},
            {"from": "gpt", "value": caption(r.attributes, 1)},
            {"from": "human", "value": "what colour is the shape?"},
            {"from": "gpt", "value": r.attributes.colour}]}
        for i, r in enumerate(records, start=1)])
    _write(root / "gqa" / "testdev_balanced_questions.json", {
        f"{i}0": {"imageId": f"n{i}", "question": "what shape is this?", "answer": r.attributes.shape,
                  "fullAnswer": f"It is a {r.attributes.shape}.", "isBalanced": True,
                  "types": {"structural": "query", "semantic": "obj", "detailed": "shape"}}
        for i, r in enumerate(records, start=1)})
    _write(root / "nocaps" / "nocaps_val_4500_captions.json", {
        "images": [{"id": i, "file_name": f"{i:04d}.jpg", "domain": "near-domain"} for i in range(1, len(records) + 1)],
        "annotations": [{"id": i * 10 + t, "image_id": i, "caption": caption(r.attributes, t)}
                        for i, r in enumerate(records, start=1) for t in range(3)]})
    return root

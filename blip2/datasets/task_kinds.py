"""The evaluation tasks' names and kinds (:mod:`blip2.datasets.tasks` scores them). Plain data, apart from
the scoring code and its torch, so that the typed configs naming a task validate without importing it."""

from __future__ import annotations

TASK_KINDS: dict[str, str] = {"coco_retrieval": "retrieval", "coco_captions": "captioning", "nocaps": "captioning",
                              "vqav2": "vqa", "okvqa": "vqa", "gqa": "gqa"}


def task_kind(task: str) -> str:
    if task not in TASK_KINDS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_KINDS)}")
    return TASK_KINDS[task]

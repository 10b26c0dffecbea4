"""The demo's client: real HTTP requests about held-out toy-world images to the served endpoint, each
answer checked against the image's ground truth.

Per image: ``POST /v1/caption``; ``POST /v1/answer`` with one instruction (the families take turns, the
held-out yes/no family among them); ``POST /v1/chat/completions`` (OpenAI format, the image as a
``data:`` URL); ``POST /v1/match`` with the true caption and with one that changes an attribute.
Standard library only: this is what any client can send.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
import urllib.request
from collections.abc import Sequence

import numpy as np

from blip2.metrics import normalise_answer
from blip2.toyworld.corpus import Record
from blip2.toyworld.text import INSTRUCTION_TASKS, caption, caption_matches, instruction_example
from blip2.toyworld.world import ATTRIBUTES

QUESTION_TASKS = tuple(task for task in INSTRUCTION_TASKS if task != "describe")  # captions are asked anyway
CHAT_PROMPT = "describe the image."


def _post(url: str, body: dict, timeout: float = 120.0) -> tuple[dict, float]:
    """POST ``body`` as JSON; the decoded answer and the latency in ms. HTTP errors raise with the body."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())
    return answer, (time.perf_counter() - start) * 1000


def _wrong_caption(record: Record, rng: np.random.Generator) -> str:
    name = tuple(ATTRIBUTES)[int(rng.integers(len(ATTRIBUTES)))]
    others = [v for v in ATTRIBUTES[name] if v != getattr(record.attributes, name)]
    return caption(record.attributes.replace(**{name: others[int(rng.integers(len(others)))]}))


def ask_endpoint(base_url: str, model_id: str, records: Sequence[Record], seed: int = 0) -> dict:
    """Ask the endpoint at ``base_url`` about each of ``records``; every exchange and how many were right."""
    rng = np.random.default_rng(seed)
    exchanges, latencies = [], []
    right = {"caption_right": 0, "answer_right": 0, "chat_right": 0, "match_right": 0}
    for i, record in enumerate(records):
        image = base64.b64encode(record.image).decode()
        truth = caption(record.attributes)
        captioned, ms = _post(f"{base_url}/v1/caption", {"image": image})
        latencies.append(ms)
        question = instruction_example(QUESTION_TASKS[i % len(QUESTION_TASKS)], record.attributes, rng)
        answered, ms = _post(f"{base_url}/v1/answer", {"image": image, "instruction": question.instruction})
        latencies.append(ms)
        chat, ms = _post(f"{base_url}/v1/chat/completions", {"model": model_id, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}},
            {"type": "text", "text": CHAT_PROMPT}]}]})
        latencies.append(ms)
        wrong = _wrong_caption(record, rng)
        matches = [_post(f"{base_url}/v1/match", {"image": image, "text": text})[0] for text in (truth, wrong)]
        chat_text = chat["choices"][0]["message"]["content"]
        checks = {
            "caption_right": caption_matches(captioned["caption"], record.attributes),
            "answer_right": normalise_answer(answered["answer"]) == normalise_answer(question.answer),
            "chat_right": caption_matches(chat_text, record.attributes),
            "match_right": matches[0]["itm_probability"] > matches[1]["itm_probability"],
        }
        for key, value in checks.items():
            right[key] += int(value)
        exchanges.append({
            "key": record.key, "truth": truth, "caption": captioned["caption"],
            "instruction": question.instruction, "task": question.task, "expected": question.answer,
            "answer": answered["answer"], "chat": chat_text,
            "match": {"true": {"text": truth, "itm_probability": matches[0]["itm_probability"]},
                      "wrong": {"text": wrong, "itm_probability": matches[1]["itm_probability"]}},
            **checks,
        })
    return {"images": len(records), **right, "median_latency_ms": statistics.median(latencies) if latencies else 0.0,
            "exchanges": exchanges}

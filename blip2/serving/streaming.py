"""Streamed answers as server-sent events: one ``data: {...}`` line per chunk as tokens are decoded, then
``data: [DONE]``, the framing OpenAI's API uses (and its client reads).

- ``/v1/chat/completions`` with ``"stream": true``: ``chat.completion.chunk`` objects (the role first,
  then one chunk per piece of text, then the finish reason, then the usage if
  ``stream_options.include_usage``).
- ``/v1/caption`` and ``/v1/answer`` with ``"stream": true``: objects with the keys of the plain answer,
  each ``caption`` / ``answer`` holding the next piece of the text; the last one carries
  ``finish_reason`` and ``usage``. Joining the pieces gives the plain answer's text.

If the model replica is lost after some text was sent, the stream ends with one
``data: {"error": {...}}`` event and no ``[DONE]``: the text is not sent again from the start.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from blip2.serving.chat import completion_id, usage
from blip2.serving.results import TokenEvent
from blip2.serving.requests import RequestError

DONE = "data: [DONE]\n\n"


def stream_requested(data: Mapping[str, Any], form: bool = False) -> bool:
    """The ``stream`` field: true or false (``"true"`` / ``"false"`` in a multipart form), default false."""
    value = data.get("stream", False)
    if form and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise RequestError(400, "invalid_field", f"stream: expected true or false, got {value!r}")
    return value


def event(item: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(item)}\n\n"


def error_event(error: RequestError) -> str:
    return event(error.to_json())


class TextChunks:
    """Chunks of ``/v1/caption`` (``key="caption"``) or ``/v1/answer`` (``key="answer"``, with the
    ``instruction`` in every chunk)."""

    def __init__(self, model: str, key: str, extra: Mapping[str, Any] | None = None) -> None:
        self.base = {"model": model, **(extra or {})}
        self.key = key

    def start(self) -> list[dict[str, Any]]:
        return []

    def __call__(self, token_event: TokenEvent) -> list[dict[str, Any]]:
        result = token_event.result
        if result is None:
            return [{**self.base, self.key: token_event.text, "finish_reason": None}] if token_event.text else []
        return [{**self.base, self.key: token_event.text, "finish_reason": result.finish_reason,
                 "usage": usage(result)}]


class ChatChunks:
    """``chat.completion.chunk`` objects of one completion."""

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.base = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model}
        self.include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def __call__(self, token_event: TokenEvent) -> list[dict[str, Any]]:
        chunks = [self._chunk({"content": token_event.text})] if token_event.text else []
        result = token_event.result
        if result is not None:
            chunks.append(self._chunk({}, result.finish_reason))
            if self.include_usage:
                chunks.append({**self.base, "choices": [], "usage": usage(result)})
        return chunks

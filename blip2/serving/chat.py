"""The OpenAI chat-completions format: a conversation in, one generation about its image out.

The messages become an image, the last user turn and the earlier turns (:mod:`blip2.serving.conversation`,
which also documents the prompt template); the runtime renders them into the LLM prompt.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from blip2.serving.conversation import parse_messages
from blip2.serving.requests import GenerationRequest, RequestError, RequestLimits, decode_image, generation_params
from blip2.serving.runtime import GenerationResult


@dataclass(frozen=True)
class ChatRequest:
    generation: GenerationRequest
    model: str
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def _invalid(message: str) -> RequestError:
    return RequestError(400, "invalid_field", message)


def chat_request(data: Mapping[str, Any], limits: RequestLimits, model_id: str) -> ChatRequest:
    """Parse a chat-completions body; ``model`` must be ``model_id`` (404 otherwise, as OpenAI answers)."""
    model = data.get("model")
    if model is None:
        raise RequestError(400, "missing_field", "the field 'model' is required")
    if model != model_id:
        raise RequestError(404, "model_not_found", f"the model {model!r} does not exist; this server serves {model_id!r}")
    n = data.get("n", 1)
    if n != 1:
        raise _invalid(f"n must be 1 (one completion per request), got {n!r}")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream must be true or false")
    options = data.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _invalid("stream_options must be an object")

    conversation = parse_messages(data.get("messages"), limits)
    params, seed = generation_params(data, limits, max_tokens_names=("max_completion_tokens", "max_tokens"))
    image = decode_image(conversation.image, limits, "image_url")
    generation = GenerationRequest(image, conversation.instruction, params, seed, conversation.history)
    return ChatRequest(generation, model, stream, bool(options.get("include_usage", False)))


def _usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion(result: GenerationResult, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": _usage(result),
    }


def chat_completion_chunks(result: GenerationResult, model: str, include_usage: bool = False) -> Iterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects: the role, the text word by word, the finish reason (and usage).

    The text is generated whole (batched with other requests) and then streamed, so the first chunk
    arrives when generation is done; the protocol is the same as token-by-token streaming."""
    base = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    yield chunk({"role": "assistant", "content": ""})
    for piece in re.findall(r"\s*\S+|\s+$", result.text):  # words with the spaces before them
        yield chunk({"content": piece})
    yield chunk({}, result.finish_reason)
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(result)}


def server_sent_events(chunks: Iterator[dict[str, Any]]) -> Iterator[str]:
    """``data: <json>\\n\\n`` per chunk, then ``data: [DONE]`` as OpenAI ends a stream."""
    for item in chunks:
        yield f"data: {json.dumps(item)}\n\n"
    yield "data: [DONE]\n\n"


def models_list(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "blip2-ray"}]}

"""The OpenAI chat-completions format: a conversation in, one generation about its image out.

The messages become an image, the last user turn and the earlier turns (:mod:`blip2.serving.conversation`,
which also documents the prompt template); the runtime renders them into the LLM prompt.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blip2.serving.conversation import parse_messages
from blip2.serving.requests import GenerationRequest, RequestError, RequestLimits, decode_image, generation_params
from blip2.serving.results import GenerationResult


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


def usage(result: GenerationResult) -> dict[str, int]:
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
        "usage": usage(result),
    }


def models_list(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "blip2-ray"}]}

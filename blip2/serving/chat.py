"""The OpenAI chat-completions format: a conversation in, one (image, instruction) generation out.

BLIP-2 answers about one image and holds no dialogue state, so a conversation reduces to the image and
the instruction it is asked about: the *last* image in any user message (``image_url`` parts with a
``data:`` URL; remote URLs are refused, the server fetches nothing) and the text of the last user
message. No text means "caption the image". System and assistant messages are accepted and not used.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from blip2.serving.requests import (
    GenerationRequest,
    RequestError,
    RequestLimits,
    decode_base64,
    decode_image,
    generation_params,
)
from blip2.serving.runtime import GenerationResult

ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class ChatRequest:
    generation: GenerationRequest
    model: str
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def _invalid(message: str) -> RequestError:
    return RequestError(400, "invalid_field", message)


def _parts(content: Any, index: int) -> list[Mapping[str, Any]]:
    """A message's content as a list of parts (a plain string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, Mapping) for p in content):
        raise _invalid(f"messages[{index}].content must be a string or a list of parts")
    return content


def chat_request(data: Mapping[str, Any], limits: RequestLimits, model_id: str) -> ChatRequest:
    """Parse a chat-completions body; ``model`` must be ``model_id`` (404 otherwise, as OpenAI answers)."""
    model = data.get("model")
    if model is None:
        raise RequestError(400, "missing_field", "the field 'model' is required")
    if model != model_id:
        raise RequestError(404, "model_not_found", f"the model {model!r} does not exist; this server serves {model_id!r}")
    messages = data.get("messages")
    if messages is None:
        raise RequestError(400, "missing_field", "the field 'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty list")
    n = data.get("n", 1)
    if n != 1:
        raise _invalid(f"n must be 1 (one completion per request), got {n!r}")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream must be true or false")
    options = data.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _invalid("stream_options must be an object")

    image_bytes, instruction = None, None
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise _invalid(f"messages[{index}] must be an object with a role in {ROLES}")
        if message["role"] != "user":
            continue
        texts = []
        for part in _parts(message.get("content"), index):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, Mapping) else url
                if not isinstance(url, str):
                    raise _invalid(f"messages[{index}]: image_url needs a 'url'")
                if not url.startswith("data:"):
                    raise RequestError(400, "invalid_image_payload",
                                       "image_url: only data: URLs are accepted (the server fetches nothing)")
                image_bytes = decode_base64(url, "image_url")
            else:
                raise _invalid(f"messages[{index}]: unsupported content part {kind!r} (use 'text' or 'image_url')")
        instruction = " ".join(t.strip() for t in texts if t.strip())
    if image_bytes is None:
        raise RequestError(400, "missing_field", "the conversation has no image: add an image_url part with a data: URL")
    if instruction is None:
        raise RequestError(400, "missing_field", "the conversation has no user message")
    if len(instruction) > limits.max_instruction_chars:
        raise RequestError(400, "instruction_too_long", f"the instruction has {len(instruction)} characters; "
                                                        f"the limit is {limits.max_instruction_chars}")
    params, seed = generation_params(data, limits, max_tokens_names=("max_completion_tokens", "max_tokens"))
    image = decode_image(image_bytes, limits, "image_url")
    return ChatRequest(GenerationRequest(image, instruction or None, params, seed), model, stream,
                       bool(options.get("include_usage", False)))


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

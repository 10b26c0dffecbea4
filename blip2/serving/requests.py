"""Requests of the serving API, parsed and validated: JSON bodies or multipart forms in, typed requests out.

Everything a client can get wrong is caught here, before a model sees it, as a :class:`RequestError`
carrying the HTTP status, a short machine-readable ``code`` and a sentence for humans. The HTTP layer only
turns it into a response; the same parsing serves the Serve ingress, the benchmark and the tests.

Images come as base64 (plain or a ``data:`` URL) in JSON, or as file parts of a multipart form, and are
decoded by :func:`blip2.images.load_image` (verified, fully decoded, RGB).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from blip2.images import ImageError, load_image
from blip2.models.generation_params import GenerationParams


class RequestError(ValueError):
    """A request the server refuses: ``status`` (4xx/5xx), ``code`` (machine-readable), ``str(e)`` (why)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def to_json(self) -> dict[str, Any]:
        """The error body, in the OpenAI API's shape (which its client reads): ``{"error": {...}}``."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "code": self.code}}


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for; the serving config sets them (``serve_toy.yaml`` documents each)."""

    max_new_tokens: int = 32  # upper bound of a request's max_new_tokens
    default_max_new_tokens: int = 20
    max_num_beams: int = 4
    max_temperature: float = 2.0
    max_instruction_chars: int = 1000
    max_text_chars: int = 1000  # /v1/match and /v1/embed texts
    max_conversation_chars: int = 8000  # all the text of a chat conversation (its last turn: max_instruction_chars)
    max_image_pixels: int = 4_000_000  # decoded width x height; bigger is a decompression bomb
    max_image_side: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens:
            raise ValueError("default_max_new_tokens must be in [1, max_new_tokens]")
        if self.max_num_beams < 1 or self.max_temperature <= 0:
            raise ValueError("max_num_beams must be >= 1 and max_temperature > 0")
        if min(self.max_instruction_chars, self.max_text_chars, self.max_conversation_chars, self.max_image_pixels,
               self.max_image_side) < 1:
            raise ValueError("character and pixel limits must be >= 1")


@dataclass(frozen=True)
class GenerationRequest:
    """Caption (``instruction`` None) or answer one image; ``history``: the earlier turns of a chat
    conversation, ``(role, text)`` (rendered into the LLM prompt by :mod:`blip2.serving.conversation`)."""

    image: Image.Image
    instruction: str | None
    params: GenerationParams
    seed: int | None = None
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class MatchRequest:
    image: Image.Image
    text: str


@dataclass(frozen=True)
class EmbedRequest:
    """At least one of the two."""

    image: Image.Image | None
    text: str | None


# ---------------------------------------------------------------------------------------------------
# Bodies


def parse_json_body(body: bytes) -> dict[str, Any]:
    """A JSON object, or a 400 that says what is wrong with it."""
    try:
        data = json.loads(body)
    except RecursionError:  # nested deeper than the parser's stack allows: a RuntimeError, not a ValueError
        raise RequestError(400, "invalid_json", "the body is not valid JSON: nested too deeply") from None
    except Exception as error:  # noqa: BLE001 - whatever the parser raises on untrusted bytes is the client's 400
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "invalid_json", f"the body must be a JSON object, got {type(data).__name__}")
    if _depth(data) > MAX_JSON_DEPTH:
        raise RequestError(400, "invalid_json", f"the body is nested more than {MAX_JSON_DEPTH} levels deep")
    return data


MAX_JSON_DEPTH = 32  # no request needs more; deeper values would make later checks (repr, copies) recurse


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:  # no need to look further down
                stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def media_type(content_type: str | None) -> str:
    """``"application/json; charset=utf-8"`` -> ``"application/json"``."""
    return (content_type or "").split(";")[0].strip().lower()


def require_media_type(content_type: str | None, allowed: tuple[str, ...]) -> str:
    kind = media_type(content_type)
    if kind not in allowed:
        raise RequestError(415, "unsupported_media_type",
                           f"content type {kind or '(none)'!r} is not accepted here; send one of {', '.join(allowed)}")
    return kind


# ---------------------------------------------------------------------------------------------------
# Fields. ``form`` is True for multipart fields, which are strings: numbers are parsed from them.


def _missing(name: str) -> RequestError:
    return RequestError(400, "missing_field", f"the field {name!r} is required")


def _invalid(name: str, why: str) -> RequestError:
    return RequestError(400, "invalid_field", f"{name}: {why}")


def _int(data: Mapping[str, Any], name: str, low: int, high: int, default: int | None, form: bool) -> int | None:
    value = data.get(name)
    if value is None:
        return default
    if form and isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise _invalid(name, f"expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise _invalid(name, f"must be in [{low}, {high}], got {value}")
    return value


def _float(data: Mapping[str, Any], name: str, low: float, high: float, low_open: bool, form: bool) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if form and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _invalid(name, f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _invalid(name, f"expected a number, got {value!r}")
    if not (low < value if low_open else low <= value) or value > high:
        raise _invalid(name, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _text(data: Mapping[str, Any], name: str, max_chars: int, required: bool, code: str) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise _missing(name)
        return None
    if not isinstance(value, str):
        raise _invalid(name, f"expected a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise RequestError(400, f"{code}_empty", f"the {name} is empty")
    if len(value) > max_chars:
        raise RequestError(400, f"{code}_too_long", f"the {name} has {len(value)} characters; the limit is {max_chars}")
    return value


def generation_params(data: Mapping[str, Any], limits: RequestLimits, form: bool = False,
                      max_tokens_names: tuple[str, ...] = ("max_new_tokens",)) -> tuple[GenerationParams, int | None]:
    """Decoding parameters of one request, every one range-checked, and its sampling seed.

    Sampling is on when the request gives a ``temperature`` > 0 or a ``top_p`` < 1 (``temperature`` 0
    means greedy, as in the OpenAI API); ``num_beams`` > 1 is beam search and cannot be combined with it."""
    max_new_tokens = None
    for name in max_tokens_names:  # the OpenAI API has two names for it
        max_new_tokens = max_new_tokens or _int(data, name, 1, limits.max_new_tokens, None, form)
    num_beams = _int(data, "num_beams", 1, limits.max_num_beams, 1, form)
    temperature = _float(data, "temperature", 0.0, limits.max_temperature, False, form)
    top_p = _float(data, "top_p", 0.0, 1.0, True, form)
    seed = _int(data, "seed", 0, 2**31 - 1, None, form)
    max_new_tokens = max_new_tokens or limits.default_max_new_tokens
    min_new_tokens = _int(data, "min_new_tokens", 0, max_new_tokens, 0, form)  # no end of sequence before it
    do_sample = (temperature is not None and temperature > 0) or (top_p is not None and top_p < 1)
    if do_sample and num_beams > 1:
        raise _invalid("num_beams", "beam search cannot be combined with sampling (temperature > 0 or top_p < 1)")
    return GenerationParams(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=do_sample,
        temperature=temperature if do_sample and temperature else 1.0, top_p=top_p if do_sample and top_p else 1.0,
    ), seed


# ---------------------------------------------------------------------------------------------------
# Images

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def decode_base64(payload: str, name: str = "image") -> bytes:
    """Bytes of a base64 string or a base64 ``data:`` URL; anything else is a 400."""
    match = _DATA_URL.match(payload)
    if payload.startswith("data:"):
        if match is None or not match.group("b64"):
            raise RequestError(400, "invalid_image_payload", f"{name}: a data: URL must be base64 (data:<type>;base64,...)")
        payload = payload[match.end():]
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_image_payload", f"{name}: not valid base64") from None


def decode_image(data: bytes, limits: RequestLimits, name: str = "image") -> Image.Image:
    """A verified RGB image, or a 400 with :mod:`blip2.images`' reason as the code (413 for too large)."""
    try:
        return load_image(data, max_pixels=limits.max_image_pixels, max_side=limits.max_image_side)
    except ImageError as error:
        status = 413 if error.reason in ("too_large", "decompression_bomb") else 400
        raise RequestError(status, error.reason, f"{name}: {error}") from None


def _image(data: Mapping[str, Any], limits: RequestLimits, required: bool, form: bool) -> Image.Image | None:
    value = data.get("image")
    if value is None or value == "":
        if required:
            raise _missing("image")
        return None
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value), limits)
    if not isinstance(value, str):
        raise _invalid("image", f"expected a base64 string or a data: URL, got {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        raise RequestError(400, "invalid_image_payload", "image: remote URLs are not fetched; send the bytes "
                                                         "(base64, a data: URL or a multipart file)")
    return decode_image(decode_base64(value), limits)


# ---------------------------------------------------------------------------------------------------
# Endpoints. ``data`` is the JSON object or the multipart form (file parts as bytes).


def caption_request(data: Mapping[str, Any], limits: RequestLimits, form: bool = False) -> GenerationRequest:
    params, seed = generation_params(data, limits, form)
    return GenerationRequest(_image(data, limits, True, form), None, params, seed)


def answer_request(data: Mapping[str, Any], limits: RequestLimits, form: bool = False) -> GenerationRequest:
    instruction = _text(data, "instruction", limits.max_instruction_chars, True, "instruction")
    params, seed = generation_params(data, limits, form)
    return GenerationRequest(_image(data, limits, True, form), instruction, params, seed)


def match_request(data: Mapping[str, Any], limits: RequestLimits, form: bool = False) -> MatchRequest:
    text = _text(data, "text", limits.max_text_chars, True, "text")
    return MatchRequest(_image(data, limits, True, form), text)


def embed_request(data: Mapping[str, Any], limits: RequestLimits, form: bool = False) -> EmbedRequest:
    text = _text(data, "text", limits.max_text_chars, False, "text")
    image = _image(data, limits, False, form)
    if image is None and text is None:
        raise RequestError(400, "missing_field", "give an 'image', a 'text' or both")
    return EmbedRequest(image, text)

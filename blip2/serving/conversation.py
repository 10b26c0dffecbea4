"""Conversations: OpenAI chat messages in, (image, last user turn, earlier turns) out, and the LLM prompt.

BLIP-2 and InstructBLIP answer about one image; a conversation is that image plus the turns about it.

Parsing (:func:`parse_messages`) takes ``system`` / ``developer``, ``user`` and ``assistant`` messages
(content a string or a list of ``text`` / ``image_url`` parts) and returns:

- the image: the one ``image_url`` part of the conversation, a ``data:`` URL (the server fetches nothing).
  No image, or more than one (``too_many_images``), is a 400;
- the instruction: the text of the last user message, which must be the conversation's last non-system
  message. Empty (an image alone) means "caption the image". The InstructBLIP Q-Former sees this turn only;
- the history: every earlier message as ``(role, text)``, system messages included.

The prompt template (:func:`render_prompt`): the LLM reads, one line each,

    <system text>                                   (if any system / developer message)
    <turn prompt of user turn 1> <assistant reply 1>
    ...
    <turn prompt of the last user turn>

where the *turn prompt* is what a single question would be prompted with: the instruction itself for
InstructBLIP, ``answer_prompt`` ("Question: {instruction} Answer:") for BLIP-2. So a one-turn conversation
is prompted exactly as ``/v1/answer`` (or ``/v1/caption``) is, and a BLIP-2 chat reads as the paper's
multi-turn examples do ("Question: ... Answer: red. Question: ... Answer:"). Prompts longer than the
runtime's ``max_text_length`` tokens lose their beginning: the oldest turns go first, the question stays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blip2.serving.requests import RequestError, RequestLimits, decode_base64

ROLES = ("system", "developer", "user", "assistant")
SYSTEM_ROLES = ("system", "developer")  # "developer" is the newer OpenAI name of "system"


@dataclass(frozen=True)
class Conversation:
    image: bytes  # still encoded; the caller decodes it with the request limits
    instruction: str | None  # the last user turn's text; None: caption the image
    history: tuple[tuple[str, str], ...]  # earlier (role, text), role "system", "user" or "assistant"


def _invalid(message: str) -> RequestError:
    return RequestError(400, "invalid_field", message)


def _parts(content: Any, index: int) -> list[Mapping[str, Any]]:
    """A message's content as a list of parts (a plain string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    if not isinstance(content, list) or not all(isinstance(p, Mapping) for p in content):
        raise _invalid(f"messages[{index}].content must be a string or a list of parts")
    return content


def _image_url(part: Mapping[str, Any], index: int) -> bytes:
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, Mapping) else url
    if not isinstance(url, str):
        raise _invalid(f"messages[{index}]: image_url needs a 'url'")
    if not url.startswith("data:"):
        raise RequestError(400, "invalid_image_payload",
                           "image_url: only data: URLs are accepted (the server fetches nothing)")
    return decode_base64(url, "image_url")


def parse_messages(messages: Any, limits: RequestLimits) -> Conversation:
    """The conversation of a chat-completions ``messages`` list (see the module docstring), or a 400."""
    if messages is None:
        raise RequestError(400, "missing_field", "the field 'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages must be a non-empty list")
    images: list[tuple[int, bytes]] = []
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise _invalid(f"messages[{index}] must be an object with a role in {ROLES}")
        role = "system" if message["role"] in SYSTEM_ROLES else message["role"]
        texts = []
        for part in _parts(message.get("content"), index):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"].strip())
            elif kind == "image_url" and role == "user":
                images.append((index, _image_url(part, index)))
            elif kind == "image_url":
                raise _invalid(f"messages[{index}]: only user messages may hold an image, not {message['role']}")
            else:
                raise _invalid(f"messages[{index}]: unsupported content part {kind!r} (use 'text' or 'image_url')")
        turns.append((role, " ".join(t for t in texts if t)))
    if not images:
        raise RequestError(400, "missing_field", "the conversation has no image: add an image_url part with a data: URL")
    if len(images) > 1:
        where = ", ".join(f"messages[{i}]" for i, _ in images)
        raise RequestError(400, "too_many_images", f"the conversation holds {len(images)} images ({where}); "
                                                   "this model answers about one image: send exactly one")
    last = max((i for i, (role, _) in enumerate(turns) if role != "system"), default=None)
    if last is None or turns[last][0] != "user":
        raise RequestError(400, "missing_field", "the conversation must end with a user message (the question)")
    instruction = turns[last][1]
    if len(instruction) > limits.max_instruction_chars:
        raise RequestError(400, "instruction_too_long", f"the instruction has {len(instruction)} characters; "
                                                        f"the limit is {limits.max_instruction_chars}")
    history = tuple(turn for i, turn in enumerate(turns) if i != last and turn[1])
    total = sum(len(text) for _, text in history) + len(instruction)
    if total > limits.max_conversation_chars:
        raise RequestError(400, "conversation_too_long", f"the conversation has {total} characters of text; "
                                                         f"the limit is {limits.max_conversation_chars}")
    return Conversation(images[0][1], instruction or None, history)


def render_prompt(history: Sequence[tuple[str, str]], instruction: str | None,
                  turn_prompt: Callable[[str | None], str]) -> str:
    """The LLM prompt of a conversation (the template in the module docstring). ``turn_prompt`` maps one
    user turn to its single-question prompt; with no history the result is ``turn_prompt(instruction)``."""
    system = [text for role, text in history if role == "system"]
    lines = ["\n".join(system)] if system else []
    awaiting_reply = False  # the last line is a user turn that has no reply yet
    for role, text in history:
        if role == "user":
            lines.append(turn_prompt(text))
            awaiting_reply = True
        elif role == "assistant":
            if awaiting_reply:
                lines[-1] = f"{lines[-1]} {text}"
            else:
                lines.append(text)
            awaiting_reply = False
    lines.append(turn_prompt(instruction))
    return "\n".join(line for line in lines if line)

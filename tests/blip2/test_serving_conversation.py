"""Chat conversations: messages to (image, last user turn, history), and the documented prompt template."""

import base64
import io

import pytest
from PIL import Image

from blip2.serving.conversation import parse_messages, render_prompt
from blip2.serving.requests import RequestError, RequestLimits

LIMITS = RequestLimits(max_instruction_chars=50, max_conversation_chars=120)
BLIP2_TURN = "Question: {} Answer:".format


def blip2_turn(instruction):
    return "" if instruction is None else BLIP2_TURN(instruction)


def instruct_turn(instruction):
    return instruction or "write a short caption for this image."


def image_part(color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}


def conversation(*turns, image_at=1):
    """Messages from (role, text) pairs; the user message at ``image_at`` also holds the image."""
    messages = [{"role": role, "content": text} for role, text in turns]
    messages[image_at]["content"] = [{"type": "text", "text": turns[image_at][1]}, image_part()]
    return messages


def refused(messages, code, limits=LIMITS):
    with pytest.raises(RequestError) as caught:
        parse_messages(messages, limits)
    assert caught.value.status == 400 and caught.value.code == code, caught.value
    return str(caught.value)


def test_a_multi_turn_conversation_becomes_the_documented_prompt():
    parsed = parse_messages(conversation(("system", "Answer in one word."), ("user", "what colour is it?"),
                                         ("assistant", "red"), ("developer", "Be polite."),
                                         ("user", "and its shape?")), LIMITS)
    assert parsed.instruction == "and its shape?" and parsed.image.startswith(b"\x89PNG")
    assert parsed.history == (("system", "Answer in one word."), ("user", "what colour is it?"),
                              ("assistant", "red"), ("system", "Be polite."))
    assert render_prompt(parsed.history, parsed.instruction, blip2_turn) == (
        "Answer in one word.\nBe polite.\nQuestion: what colour is it? Answer: red\nQuestion: and its shape? Answer:")
    assert render_prompt(parsed.history, parsed.instruction, instruct_turn) == (
        "Answer in one word.\nBe polite.\nwhat colour is it? red\nand its shape?")


def test_one_turn_is_prompted_exactly_as_a_single_question_or_caption():
    parsed = parse_messages(conversation(("system", ""), ("user", "what size is it?")), LIMITS)
    assert parsed.history == () and render_prompt(parsed.history, parsed.instruction, blip2_turn) == BLIP2_TURN("what size is it?")
    caption = parse_messages([{"role": "user", "content": [image_part()]}], LIMITS)
    assert caption.instruction is None
    assert render_prompt(caption.history, None, instruct_turn) == instruct_turn(None)
    assert render_prompt(caption.history, None, blip2_turn) == ""


def test_turns_without_a_reply_or_a_question_and_an_image_in_an_earlier_turn():
    parsed = parse_messages(conversation(("user", "look at this"), ("user", "what is it?"), ("assistant", "a star"),
                                         ("assistant", "a blue one"), ("user", "where?"), image_at=0), LIMITS)
    assert render_prompt(parsed.history, parsed.instruction, instruct_turn) == (
        "look at this\nwhat is it? a star\na blue one\nwhere?")


def test_bad_conversations_get_a_clear_400():
    two_images = conversation(("user", "this one"), ("assistant", "ok"), ("user", "and this?"), image_at=0)
    two_images[2]["content"] = [{"type": "text", "text": "and this?"}, image_part((0, 0, 255))]
    message = refused(two_images, "too_many_images")
    assert "2 images" in message and "messages[0], messages[2]" in message
    refused(conversation(("system", "hi"), ("user", "q"), ("assistant", "a")), "missing_field")  # no question last
    refused([{"role": "assistant", "content": [image_part()]}, {"role": "user", "content": "q"}], "invalid_field")
    refused([{"role": "user", "content": "no image"}], "missing_field")
    refused(None, "missing_field")
    refused([], "invalid_field")
    refused(conversation(("system", "s"), ("user", "why " * 20)), "instruction_too_long")
    refused(conversation(("system", "x" * 100), ("user", "q"), ("assistant", "y" * 30), ("user", "q")),
            "conversation_too_long")

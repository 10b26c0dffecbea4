"""Request parsing and validation, and the OpenAI chat format (no model, no server)."""

import base64
import io
import json

import pytest
from PIL import Image

from blip2.models.generation import GenerationParams
from blip2.serving.chat import chat_completion, chat_request
from blip2.serving.decoding import TokenEvent
from blip2.serving.streaming import DONE, ChatChunks, TextChunks, event, stream_requested
from blip2.serving.requests import (
    RequestError,
    RequestLimits,
    answer_request,
    caption_request,
    decode_base64,
    embed_request,
    generation_params,
    match_request,
    parse_json_body,
    require_media_type,
)
from blip2.serving.runtime import GenerationResult

LIMITS = RequestLimits(max_new_tokens=16, default_max_new_tokens=5, max_num_beams=3, max_instruction_chars=50,
                       max_text_chars=40, max_image_pixels=10_000, max_image_side=500)


def png(size=(32, 32), color=(10, 200, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def refused(call, status: int, code: str) -> RequestError:
    with pytest.raises(RequestError) as info:
        call()
    assert (info.value.status, info.value.code) == (status, code), str(info.value)
    assert str(info.value) and info.value.to_json()["error"]["code"] == code
    return info.value


# ---------------------------------------------------------------------------------------------------
# Generation parameters


def test_generation_params_defaults_greedy_and_sampling_switch():
    assert generation_params({}, LIMITS) == (GenerationParams(max_new_tokens=5), None)
    params, seed = generation_params({"temperature": 0.7, "seed": 4}, LIMITS)
    assert params.do_sample and params.temperature == 0.7 and params.top_p == 1.0 and seed == 4
    params, _ = generation_params({"top_p": 0.5}, LIMITS)
    assert params.do_sample and params.top_p == 0.5 and params.temperature == 1.0
    params, _ = generation_params({"temperature": 0, "num_beams": 3, "max_new_tokens": 16}, LIMITS)
    assert not params.do_sample and params.num_beams == 3 and params.max_new_tokens == 16  # temperature 0: greedy
    params, _ = generation_params({"max_new_tokens": "7", "num_beams": "2"}, LIMITS, form=True)
    assert (params.max_new_tokens, params.num_beams) == (7, 2)  # multipart fields are strings


@pytest.mark.parametrize("data", [
    {"max_new_tokens": 0}, {"max_new_tokens": 17}, {"max_new_tokens": 2.5}, {"max_new_tokens": True},
    {"max_new_tokens": "3"}, {"num_beams": 0}, {"num_beams": 4}, {"temperature": -0.1}, {"temperature": 2.5},
    {"temperature": float("nan")}, {"top_p": 0}, {"top_p": 1.5}, {"seed": -1}, {"num_beams": 2, "top_p": 0.9},
])
def test_generation_params_out_of_range_are_400(data):
    refused(lambda: generation_params(data, LIMITS), 400, "invalid_field")


def test_form_numbers_must_parse():
    refused(lambda: generation_params({"max_new_tokens": "ten"}, LIMITS, form=True), 400, "invalid_field")
    refused(lambda: generation_params({"temperature": "hot"}, LIMITS, form=True), 400, "invalid_field")


# ---------------------------------------------------------------------------------------------------
# Bodies, images, fields


def test_json_body_and_media_type():
    assert parse_json_body(b'{"a": 1}') == {"a": 1}
    refused(lambda: parse_json_body(b'{"a": '), 400, "invalid_json")
    refused(lambda: parse_json_body(b"\xff\xfe"), 400, "invalid_json")
    refused(lambda: parse_json_body(b"[1]"), 400, "invalid_json")
    refused(lambda: parse_json_body(b"[" * 100_000 + b"]" * 100_000), 400, "invalid_json")  # RecursionError inside
    refused(lambda: parse_json_body(b'{"a": ' + b"[" * 500 + b"]" * 500 + b"}"), 400, "invalid_json")  # parses; too deep
    refused(lambda: parse_json_body(b'{"a": NaN'), 400, "invalid_json")
    assert require_media_type("Application/JSON; charset=utf-8", ("application/json",)) == "application/json"
    refused(lambda: require_media_type("text/plain", ("application/json",)), 415, "unsupported_media_type")
    refused(lambda: require_media_type(None, ("application/json",)), 415, "unsupported_media_type")


def test_image_payloads_base64_data_url_and_bytes_decode_to_the_same_image():
    data = png()
    images = [caption_request({"image": b64(data)}, LIMITS).image,
              caption_request({"image": f"data:image/png;base64,{b64(data)}"}, LIMITS).image,
              caption_request({"image": data}, LIMITS, form=True).image]
    assert all(i.mode == "RGB" and i.size == (32, 32) and i.tobytes() == images[0].tobytes() for i in images)
    assert decode_base64(b64(data)[:20] + "\n" + b64(data)[20:]) == data  # line breaks are fine


@pytest.mark.parametrize("payload, status, code", [
    (b64(b"not an image at all"), 400, "not_an_image"),
    (b64(png()[:50]), 400, "truncated"),
    (b64(png(size=(200, 200))), 413, "decompression_bomb"),  # 40,000 pixels > 10,000
    ("!!!", 400, "invalid_image_payload"),
    ("data:image/png,notbase64", 400, "invalid_image_payload"),
    ("https://example.com/cat.png", 400, "invalid_image_payload"),
    (123, 400, "invalid_field"),
])
def test_bad_images_are_refused_with_the_reason(payload, status, code):
    refused(lambda: caption_request({"image": payload}, LIMITS), status, code)


def test_fields_of_each_endpoint():
    image = b64(png())
    answer = answer_request({"image": image, "instruction": "  what colour?  "}, LIMITS)
    assert answer.instruction == "what colour?" and answer.params.max_new_tokens == 5
    refused(lambda: answer_request({"image": image}, LIMITS), 400, "missing_field")
    refused(lambda: answer_request({"image": image, "instruction": " "}, LIMITS), 400, "instruction_empty")
    refused(lambda: answer_request({"image": image, "instruction": "x" * 51}, LIMITS), 400, "instruction_too_long")
    refused(lambda: answer_request({"image": image, "instruction": 3}, LIMITS), 400, "invalid_field")
    refused(lambda: caption_request({}, LIMITS), 400, "missing_field")
    assert match_request({"image": image, "text": "a green square"}, LIMITS).text == "a green square"
    refused(lambda: match_request({"image": image, "text": "x" * 41}, LIMITS), 400, "text_too_long")
    refused(lambda: match_request({"text": "a"}, LIMITS), 400, "missing_field")
    assert embed_request({"text": "a"}, LIMITS).image is None
    assert embed_request({"image": image}, LIMITS).text is None
    refused(lambda: embed_request({}, LIMITS), 400, "missing_field")


# ---------------------------------------------------------------------------------------------------
# Chat completions


def chat_body(**extra):
    url = f"data:image/png;base64,{b64(png())}"
    return {"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "what colour is it?"},
    ], **extra}


def test_chat_takes_the_image_the_last_user_turn_and_the_turns_before_it():
    chat = chat_request(chat_body(max_tokens=7, temperature=0.5, stream=True), LIMITS, "m")
    assert chat.generation.instruction == "what colour is it?" and chat.generation.image.size == (32, 32)
    assert chat.generation.history == (("system", "be brief"), ("user", "hi"), ("assistant", "hello"))
    assert chat.generation.params.max_new_tokens == 7 and chat.generation.params.do_sample and chat.stream
    caption = chat_request({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(png())}"}}]}]}, LIMITS, "m")
    assert caption.generation.instruction is None  # no text: a caption
    assert chat_request(chat_body(max_completion_tokens=3), LIMITS, "m").generation.params.max_new_tokens == 3


@pytest.mark.parametrize("body, status, code", [
    (chat_body(model="other"), 404, "model_not_found"),
    ({"messages": []}, 400, "missing_field"),
    ({"model": "m"}, 400, "missing_field"),
    ({"model": "m", "messages": []}, 400, "invalid_field"),
    ({"model": "m", "messages": [{"role": "user", "content": "no image"}]}, 400, "missing_field"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_field"),
    (chat_body(n=3), 400, "invalid_field"),
    (chat_body(stream="yes"), 400, "invalid_field"),
    (chat_body(max_tokens=100), 400, "invalid_field"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, 400, "invalid_field"),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}, 400, "invalid_image_payload"),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(b"junk")}}]}]}, 400, "not_an_image"),
    (chat_body(messages=chat_body()["messages"] * 2), 400, "too_many_images"),
    (chat_body(messages=chat_body()["messages"][:3]), 400, "missing_field"),  # ends with the assistant
])
def test_bad_chat_requests(body, status, code):
    refused(lambda: chat_request(body, LIMITS, "m"), status, code)


def test_chat_responses_plain_and_streamed_carry_the_same_text():
    result = GenerationResult("a small green  square", 12, 5, "stop")
    completion = chat_completion(result, "m")
    assert completion["choices"][0]["message"]["content"] == result.text
    assert completion["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    pieces = [TokenEvent(0, "a"), TokenEvent(0, " small"), TokenEvent(0, ""), TokenEvent(0, " green  square", result)]
    framer = ChatChunks("m", include_usage=True)
    events = [event(c) for c in framer.start()] + [event(c) for p in pieces for c in framer(p)] + [DONE]
    assert events[-1] == "data: [DONE]\n\n" and all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == result.text
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["delta"].get("content") != "" for c in chunks[1:] if c["choices"])  # no empty pieces
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["total_tokens"] == 17
    assert len({c["id"] for c in chunks}) == 1


def test_caption_and_answer_streams_carry_the_plain_answers_keys():
    result = GenerationResult("red", 12, 2, "length")
    framer = TextChunks("m", "answer", {"instruction": "what colour?"})
    pieces = (TokenEvent(0, "re"), TokenEvent(0, ""), TokenEvent(0, "d", result))
    chunks = framer.start() + [c for p in pieces for c in framer(p)]
    assert [c["answer"] for c in chunks] == ["re", "d"] and all(c["instruction"] == "what colour?" for c in chunks)
    assert chunks[0]["finish_reason"] is None and chunks[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}


@pytest.mark.parametrize("data, form, expected", [({}, False, False), ({"stream": True}, False, True),
                                                  ({"stream": "true"}, True, True), ({"stream": "False"}, True, False)])
def test_stream_flag(data, form, expected):
    assert stream_requested(data, form) is expected


@pytest.mark.parametrize("data, form", [({"stream": "true"}, False), ({"stream": 1}, False), ({"stream": "yes"}, True)])
def test_a_bad_stream_flag_is_a_400(data, form):
    refused(lambda: stream_requested(data, form), 400, "invalid_field")

"""The serving app on a real local Ray Serve instance, over loopback HTTP: every endpoint, the official
``openai`` client, bad input, a bounded load with autoscaling 1 -> 2 -> 1, and a replica killed mid-load.

One app per module (the session's Ray instance, Serve started here and shut down at the end); the
test config shortens the autoscaling delays so that scaling happens within seconds."""

import asyncio
import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from blip2.config import load_config
from pipelines.common import CONFIG_DIR
from pipelines.serve import ServeConfig, application, main
from tests.ports import free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

APP = "blip2-test"
MAX_BODY = 256 * 1024
TEST_OVERRIDES = [
    "replica.num_cpus=0.5", "replica.max_batch_size=8", "replica.batch_wait_timeout_s=0.005",
    "replica.health_check_period_s=2", "replica.graceful_shutdown_timeout_s=2", "replica.max_ongoing_requests=16",
    "autoscaling.min_replicas=1", "autoscaling.max_replicas=2", "autoscaling.target_ongoing_requests=2",
    "autoscaling.upscale_delay_s=0.5", "autoscaling.downscale_delay_s=2", "autoscaling.metrics_interval_s=0.2",
    "autoscaling.look_back_period_s=1", "http.ingress_num_cpus=0.1", f"http.max_body_bytes={MAX_BODY}",
    "limits.max_image_pixels=1000000", "limits.max_new_tokens=16", "limits.default_max_new_tokens=6",
    "replica.stream_interval_s=0",  # a piece of text per token: the streaming tests see pieces even on the toy
]


def png(color=(200, 30, 30), size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return f"data:image/png;base64,{b64(data)}"


@pytest.fixture(scope="module")
def server(ray_local):
    from ray import serve

    port = free_port()
    config = load_config(ServeConfig, CONFIG_DIR / "serve_toy.yaml", [*TEST_OVERRIDES, f"http.port={port}"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(config), name=APP, route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, config
    serve.shutdown()


def model_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments["VisionLanguageModel"]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------
# Endpoints


def test_every_endpoint_answers_in_its_format(server):
    client, config = server
    image = png()
    assert client.get("/healthz").json() == {"status": "ok", "model": config.model.id}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [config.model.id]

    caption = client.post("/v1/caption", json={"image": b64(image), "max_new_tokens": 5}).json()
    assert isinstance(caption["caption"], str) and 1 <= caption["usage"]["completion_tokens"] <= 5
    assert caption["finish_reason"] in ("stop", "length")
    multipart = client.post("/v1/caption", files={"image": ("x.png", image, "image/png")},
                            data={"max_new_tokens": "5"})
    assert multipart.status_code == 200 and multipart.json()["caption"] == caption["caption"]  # greedy

    answer = client.post("/v1/answer", json={"image": data_url(image), "instruction": "what colour is the shape?",
                                             "num_beams": 2, "max_new_tokens": 4}).json()
    assert answer["instruction"] == "what colour is the shape?" and isinstance(answer["answer"], str)
    sampled = client.post("/v1/answer", json={"image": b64(image), "instruction": "describe the image.",
                                              "temperature": 0.8, "top_p": 0.9, "seed": 1}).json()
    assert sampled["usage"]["completion_tokens"] <= config.limits.default_max_new_tokens

    match = client.post("/v1/match", json={"image": b64(image), "text": "a large red circle"}).json()
    assert 0 <= match["itm_probability"] <= 1 and -1 <= match["itc_similarity"] <= 1

    both = client.post("/v1/embed", json={"image": b64(image), "text": "a red circle"}).json()
    text_only = client.post("/v1/embed", json={"text": "a red circle"}).json()
    image_only = client.post("/v1/embed", files={"image": ("x.png", image, "image/png")}).json()
    assert len(both["image_embedding"]) == 8 and text_only["image_embedding"] is None
    flat = lambda rows: [v for row in rows for v in row]  # noqa: E731
    assert image_only["text_embedding"] is None
    assert flat(image_only["image_embedding"]) == pytest.approx(flat(both["image_embedding"]), abs=1e-5)
    assert text_only["text_embedding"] == pytest.approx(both["text_embedding"], abs=1e-5)
    assert sum(v * v for v in both["text_embedding"]) == pytest.approx(1.0, abs=1e-4)  # normalised

    chat = client.post("/v1/chat/completions", json={
        "model": config.model.id, "max_tokens": 5,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "what colour is the shape?"},
                                                  {"type": "image_url", "image_url": {"url": data_url(image)}}]}],
    }).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    # The chat route and /v1/answer are the same generation.
    same = client.post("/v1/answer", json={"image": b64(image), "instruction": "what colour is the shape?",
                                           "max_new_tokens": 5}).json()
    assert chat["choices"][0]["message"]["content"] == same["answer"]


def test_openai_client_plain_and_streamed(server):
    openai = pytest.importorskip("openai")
    client, config = server
    api = openai.OpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "describe the image."},
        {"type": "image_url", "image_url": {"url": data_url(png((30, 30, 200)))}}]}]
    completion = api.chat.completions.create(model=config.model.id, messages=messages, max_tokens=6)
    text = completion.choices[0].message.content
    assert isinstance(text, str) and completion.usage.completion_tokens >= 1
    assert [m.id for m in api.models.list()] == [config.model.id]

    stream = api.chat.completions.create(model=config.model.id, messages=messages, max_tokens=6, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text  # the streamed pieces add up to the plain answer (greedy)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens

    # Forced to 12 tokens, the text arrives in pieces as it is decoded, not whole at the end.
    forced = {"min_new_tokens": 12}
    whole = api.chat.completions.create(model=config.model.id, messages=messages, max_tokens=12, extra_body=forced)
    pieces = [c.choices[0].delta.content for c in api.chat.completions.create(
        model=config.model.id, messages=messages, max_tokens=12, extra_body=forced, stream=True) if c.choices]
    assert whole.usage.completion_tokens == 12 and "".join(p or "" for p in pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) >= 2, pieces  # more than one (pieces queued behind the consumer merge)

    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="no-such-model", messages=messages)


def test_openai_client_multi_turn_plain_and_streamed(server):
    openai = pytest.importorskip("openai")
    client, config = server
    api = openai.OpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key="unused", max_retries=0, timeout=60)
    image = {"type": "image_url", "image_url": {"url": data_url(png((30, 160, 30)))}}
    messages = [{"role": "system", "content": "answer in a few words."},
                {"role": "user", "content": [{"type": "text", "text": "what colour is the shape?"}, image]},
                {"role": "assistant", "content": "green"},
                {"role": "user", "content": "and what shape is it?"}]
    completion = api.chat.completions.create(model=config.model.id, messages=messages, max_tokens=6)
    text = completion.choices[0].message.content
    single = api.chat.completions.create(model=config.model.id, max_tokens=6, messages=[
        {"role": "user", "content": [{"type": "text", "text": "and what shape is it?"}, image]}])
    assert completion.usage.prompt_tokens > single.usage.prompt_tokens  # the earlier turns reached the LLM
    chunks = list(api.chat.completions.create(model=config.model.id, messages=messages, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text

    second_image = {"role": "user", "content": [{"type": "text", "text": "and this one?"}, image]}
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=config.model.id, messages=[*messages, second_image])
    assert caught.value.code == "too_many_images" and "2 images" in caught.value.message


def sse(response: httpx.Response) -> list:
    """The ``data:`` payloads of a server-sent event stream, JSON-decoded except ``[DONE]``."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.iter_lines() if line]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_caption_and_answer_stream_over_plain_http(server):
    client, config = server
    image = b64(png((30, 200, 30)))
    for route, key, extra in (("/v1/caption", "caption", {}), ("/v1/answer", "answer", {"instruction": "what shape?"})):
        body = {"image": image, "max_new_tokens": 10, "min_new_tokens": 10, **extra}
        plain = client.post(route, json=body).json()
        with client.stream("POST", route, json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = sse(response)
        # more than one piece, then the end. Not "one per token" even at stream_interval_s=0: pieces that queue
        # up while the stream waits on its consumer leave as one (serve_model.py), and under load the first
        # piece and the other nine were once all there was (CI)
        assert events[-1] == "[DONE]" and len(events) >= 3, events
        chunks = events[:-1]
        assert "".join(c[key] for c in chunks) == plain[key] and plain["usage"]["completion_tokens"] == 10
        assert [c["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 10
        assert all(c["model"] == config.model.id and c.get("instruction") == extra.get("instruction") for c in chunks)
    # A multipart form streams too; a bad flag is a 400 before anything is generated.
    with client.stream("POST", "/v1/caption", files={"image": ("x.png", png(), "image/png")},
                       data={"stream": "true", "max_new_tokens": "3"}) as response:
        assert sse(response)[-1] == "[DONE]"
    refused = client.post("/v1/caption", json={"image": image, "stream": "yes"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_field"


def test_beam_search_streams_as_one_piece(server):
    client, _ = server
    body = {"image": b64(png()), "instruction": "what colour is the shape?", "num_beams": 2, "max_new_tokens": 4}
    plain = client.post("/v1/answer", json=body).json()
    with client.stream("POST", "/v1/answer", json={**body, "stream": True}) as response:
        events = sse(response)
    assert "".join(c["answer"] for c in events[:-1]) == plain["answer"] and events[-1] == "[DONE]"


# ---------------------------------------------------------------------------------------------------
# Bad input


def bad_requests(config):
    good = {"image": b64(png())}
    bomb = png(size=(1200, 1200))  # 1.44 M pixels > the test limit of 1 M, a few kB on the wire
    chat_messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}}]}]
    return [
        ("not an image", "/v1/caption", {"json": {"image": b64(b"hello, world" * 10)}}, 400, "not_an_image"),
        ("truncated image", "/v1/caption", {"json": {"image": b64(png()[:60])}}, 400, "truncated"),
        ("decompression bomb", "/v1/caption", {"json": {"image": b64(bomb)}}, 413, "decompression_bomb"),
        ("body over the limit", "/v1/caption", {"json": {"image": "A" * (MAX_BODY + 10)}}, 413, "body_too_large"),
        ("invalid base64", "/v1/caption", {"json": {"image": "%%%not base64%%%"}}, 400, "invalid_image_payload"),
        ("empty instruction", "/v1/answer", {"json": {**good, "instruction": "   "}}, 400, "instruction_empty"),
        ("overlong instruction", "/v1/answer",
         {"json": {**good, "instruction": "why " * config.limits.max_instruction_chars}}, 400, "instruction_too_long"),
        ("max_new_tokens too big", "/v1/caption", {"json": {**good, "max_new_tokens": 10_000}}, 400, "invalid_field"),
        ("min_new_tokens above max_new_tokens", "/v1/caption", {"json": {**good, "max_new_tokens": 3, "min_new_tokens": 5}},
         400, "invalid_field"),
        ("num_beams 0", "/v1/caption", {"json": {**good, "num_beams": 0}}, 400, "invalid_field"),
        ("temperature too high", "/v1/caption", {"json": {**good, "temperature": 9.5}}, 400, "invalid_field"),
        ("top_p 0", "/v1/caption", {"json": {**good, "top_p": 0}}, 400, "invalid_field"),
        ("beams with sampling", "/v1/caption", {"json": {**good, "num_beams": 2, "temperature": 0.7}}, 400, "invalid_field"),
        ("wrong type", "/v1/caption", {"json": {**good, "max_new_tokens": "many"}}, 400, "invalid_field"),
        ("wrong content type", "/v1/caption", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("malformed JSON", "/v1/caption", {"content": b"{\"image\": ", "headers": {"content-type": "application/json"}},
         400, "invalid_json"),
        ("JSON that is not an object", "/v1/caption", {"json": [1, 2]}, 400, "invalid_json"),
        ("JSON nested 100,000 levels", "/v1/caption", {"content": b"[" * 100_000 + b"]" * 100_000,
                                                       "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ("chat nested 100,000 levels", "/v1/chat/completions", {"content": b'{"messages": ' + b"[" * 100_000,
                                                                "headers": {"content-type": "application/json"}},
         400, "invalid_json"),
        ("missing image", "/v1/caption", {"json": {"max_new_tokens": 3}}, 400, "missing_field"),
        ("missing instruction", "/v1/answer", {"json": good}, 400, "missing_field"),
        ("missing text", "/v1/match", {"json": good}, 400, "missing_field"),
        ("embed with nothing", "/v1/embed", {"json": {}}, 400, "missing_field"),
        ("multipart with a text file", "/v1/caption", {"files": {"image": ("a.txt", b"plain text", "text/plain")}},
         400, "not_an_image"),
        ("unknown model", "/v1/chat/completions", {"json": {"model": "gpt-9", "messages": chat_messages}}, 404,
         "model_not_found"),
        ("chat without an image", "/v1/chat/completions",
         {"json": {"model": config.model.id, "messages": [{"role": "user", "content": "hi"}]}}, 400, "missing_field"),
        ("chat with a remote image", "/v1/chat/completions", {"json": {"model": config.model.id, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}},
         400, "invalid_image_payload"),
        ("chat with n=2", "/v1/chat/completions",
         {"json": {"model": config.model.id, "messages": chat_messages, "n": 2}}, 400, "invalid_field"),
        ("chat as multipart", "/v1/chat/completions", {"files": {"image": ("x.png", png(), "image/png")}}, 415,
         "unsupported_media_type"),
    ]


def test_bad_input_gets_a_4xx_json_reason_and_the_server_stays_up(server):
    client, config = server
    for name, route, kwargs, status, code in bad_requests(config):
        response = client.post(route, **kwargs)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"], (name, error)
    assert client.post("/v1/caption", json={"image": b64(png())}).status_code == 200
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------------
# Load, autoscaling, a replica killed


async def _load(base_url: str, total: int, concurrency: int, during=None) -> list[int | str]:
    """``total`` caption/answer requests, ``concurrency`` at a time; each one's status code (or the
    exception's name). ``during(done)`` is called as requests complete."""
    images = [b64(png((17 * i % 256, 40, 255 - 17 * i % 256))) for i in range(8)]
    results: list[int | str] = []
    queue = iter(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in queue:
            body = {"image": images[i % 8], "max_new_tokens": 4}
            route = "/v1/caption" if i % 2 else "/v1/answer"
            if i % 2 == 0:
                body["instruction"] = "what shape is it?"
            try:
                results.append((await client.post(route, json=body)).status_code)
            except httpx.HTTPError as error:
                results.append(type(error).__name__)
            if during is not None:
                during(len(results))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def test_bounded_load_has_no_errors_and_autoscales_up_and_back_down(server):
    client, _ = server
    wait_for(lambda: model_replicas() == 1, 60, "one model replica before the load")
    seen = []
    results = asyncio.run(_load(str(client.base_url), 500, 16, during=lambda done: seen.append(model_replicas())
                                if done % 25 == 0 else None))
    errors = [r for r in results if r != 200]
    assert len(results) == 500 and not errors, errors[:5]
    if max(seen) < 2:  # the load was over before the autoscaler's next decision: keep the load on
        results = asyncio.run(_load(str(client.base_url), 400, 16))
        assert all(r == 200 for r in results)
        wait_for(lambda: model_replicas() == 2 or max(seen) == 2, 30, "a second replica")
    assert max(seen + [model_replicas()]) == 2
    wait_for(lambda: model_replicas() == 1, 60, "the model deployment to scale back down to 1 replica")


def test_a_replica_killed_mid_load_fails_at_most_one_percent(server):
    import ray

    client, _ = server
    killed = []

    def kill_one(done: int) -> None:
        if killed or done < 60:
            return
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "VisionLanguageModel" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        killed.append(names[0])

    results = asyncio.run(_load(str(client.base_url), 400, 16, during=kill_one))
    failures = [r for r in results if r != 200]
    assert killed and len(results) == 400
    assert len(failures) <= 4, failures  # <= 1 %
    wait_for(lambda: model_replicas() >= 1, 60, "a replacement replica")
    assert client.get("/healthz").status_code == 200
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert killed[0] not in names


LARGE_INTERVAL_S = 0.1


@pytest.fixture(scope="module")
def large_app(server):
    """An app of the larger preset, one replica, answers forced to 48 tokens: long enough (hundreds of
    ms) for a disconnect or a kill to land mid-answer."""
    from ray import serve

    client, _ = server
    config = load_config(ServeConfig, CONFIG_DIR / "serve_toy.yaml", [
        *TEST_OVERRIDES, "model.source=toy-instruct-opt-large", "model.retrieval=", "replica.num_cpus=0.25",
        "autoscaling.max_replicas=1", "limits.max_new_tokens=48", f"replica.stream_interval_s={LARGE_INTERVAL_S}",
        f"http.port={client.base_url.port}"])
    serve.run(application(config), name="large", route_prefix="/large")
    yield client, "/large"
    serve.delete("large")


def long_answer(color: tuple[int, int, int], stream: bool) -> dict:
    return {"image": b64(png(color)), "instruction": "what shape?", "max_new_tokens": 48, "min_new_tokens": 48,
            "stream": stream}


@pytest.mark.slow
def test_a_client_gone_mid_stream_leaves_the_decode_batch_and_the_others_finish(large_app):
    """A streaming client closes its connection after its first piece of text: its request leaves the
    replica's decode batch (counted as cancelled before it finished) while three others decoding beside
    it finish, each with the answer it gets alone."""
    from ray import serve

    client, prefix = large_app
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    alone = [client.post(f"{prefix}/v1/answer", json=long_answer(c, False)).json()["answer"] for c in colors]
    model = serve.get_deployment_handle("VisionLanguageModel", app_name="large")
    before = model.decoder_stats.remote().result()

    async def streamed(http: httpx.AsyncClient, body: dict, leave_early: bool) -> tuple[list, float]:
        events, start = [], time.perf_counter()
        async with http.stream("POST", f"{prefix}/v1/answer", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if leave_early and events[-1] != "[DONE]" and json.loads(events[-1])["answer"]:
                        break  # leaving the block closes the connection mid-answer
        return events, time.perf_counter() - start

    async def together() -> list[list]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as http:
            return await asyncio.gather(streamed(http, long_answer((120, 120, 30), True), True),
                                        *(streamed(http, long_answer(c, True), False) for c in colors))

    (gone, _), *others = asyncio.run(together())
    wait_for(lambda: model.decoder_stats.remote().result()["running"] == 0, 30, "the decode batch to empty")
    after = model.decoder_stats.remote().result()
    assert len(gone) == 1 and after["cancelled"] == before["cancelled"] + 1, (gone, before, after)
    for (events, seconds), expected in zip(others, alone, strict=True):
        chunks = [json.loads(e) for e in events[:-1]]
        assert events[-1] == "[DONE]" and chunks[-1]["usage"]["completion_tokens"] == 48
        assert "".join(c["answer"] for c in chunks) == expected
        # Pieces after the first leave at most every stream_interval_s (48 tokens, far fewer events).
        assert len(chunks) <= 2 + seconds / LARGE_INTERVAL_S, (len(chunks), seconds)


@pytest.mark.slow
def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error_event(large_app):
    """After text was sent, a lost replica is an error event, not a retry that would send text twice."""
    import ray

    client, prefix = large_app
    with client.stream("POST", f"{prefix}/v1/answer", json=long_answer((200, 30, 30), True)) as response:
        lines = (line for line in response.iter_lines() if line)
        first = next(lines)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "large" in a["name"] and "VisionLanguageModel" in a["name"]]
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        rest = list(lines)
    events = [json.loads(line[len("data: "):]) for line in [first, *rest]]
    assert rest[-1] != "data: [DONE]" and events[-1]["error"]["code"] == "replica_lost", events[-1]
    assert 0 < len("".join(e["answer"] for e in events[:-1])) and all("usage" not in e for e in events[:-1])


def test_the_job_entrypoint_deploys_checks_and_removes_its_app(server, capsys):
    from ray import serve

    client, _ = server
    code = main(["--check", f"http.port={client.base_url.port}", "http.app_name=check", "http.route_prefix=/check",
                 "replica.num_cpus=0.25", "http.ingress_num_cpus=0.05", "model.retrieval=", "autoscaling.max_replicas=1",
                 "limits.default_max_new_tokens=4"])
    printed = capsys.readouterr().out
    assert code == 0 and 'healthz: {"status": "ok"' in printed and '"caption": ' in printed
    assert "check" not in serve.status().applications and APP in serve.status().applications

"""``blip2 serve``: BLIP-2 / InstructBLIP on Ray Serve, with autoscaled, dynamically batched replicas.

    python -m pipelines.serve [--config pipelines/configs/serve_toy.yaml] [key=value ...] [--check]
    serve run pipelines.serve:build_app config=pipelines/configs/serve_toy.yaml [model.source=DIR ...]
    serve deploy pipelines/configs/serve_deploy.yaml        # on a running cluster (`ray start --head`)

Two deployments. ``Gateway`` is the FastAPI ingress: it reads and validates every request
(:mod:`blip2.serving.requests`, :mod:`blip2.serving.chat`) and answers bad ones with a 4xx JSON error
before a model sees them. ``VisionLanguageModel`` holds the model (loaded once per replica); it autoscales
between ``autoscaling.min_replicas`` and ``max_replicas`` on ongoing requests. It generates with
continuous batching (``replica.batching: continuous``, :mod:`blip2.serving.decoding` driven by a
background thread: a request joins the running batch at the next step and its tokens stream out as
they are decoded) or with ``@serve.batch`` (``replica.batching: serve_batch``: whole requests batched,
the text sent when the batch is done); match and embed always use ``@serve.batch``. Routes: POST
/v1/caption, /v1/answer, /v1/match, /v1/embed, /v1/chat/completions (OpenAI format; these three
stream with ``"stream": true``, :mod:`blip2.serving.streaming`; chat is multi-turn), GET /v1/models,
GET /healthz, and GET /: a page to try the model in a browser (:mod:`blip2.serving.page`).

A Ray instance this command starts runs Ray Serve's throughput mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``,
without its direct ingress: ``pipelines.common.SERVE_ENVIRONMENT``); ``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` in
the environment turns it off. A cluster's nodes set it in their own environment (``cluster/Dockerfile``).
"""

# No `from __future__ import annotations`: FastAPI reads the route methods' annotations (`request: Request`)
# and Serve's ingress wrapping hides the module globals that would resolve them as strings.
import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.formparsers import MultiPartParser
from starlette.datastructures import UploadFile

from blip2.config import from_dict, load_config, to_dict
from blip2.serving.chat import chat_completion, chat_request, models_list
from blip2.serving.decoding import TokenEvent
from blip2.serving.page import CONTENT_SECURITY_POLICY, page_html
from blip2.serving.requests import (
    GenerationRequest,
    RequestError,
    answer_request,
    caption_request,
    embed_request,
    match_request,
    parse_json_body,
    require_media_type,
)
from blip2.serving.runtime import GenerationResult
from blip2.serving.streaming import DONE, ChatChunks, TextChunks, error_event, event, stream_requested
from pipelines.common import CONFIG_DIR, init_ray, job_parser, log, parse_config, serve_environment
from pipelines.serve_config import (  # noqa: F401 - re-exported: the job's config is imported from here
    DEFAULT_CONFIG,
    AutoscalingSettings,
    HttpSettings,
    ModelSettings,
    ReplicaSettings,
    ServeConfig,
)
from pipelines.serve_model import VisionLanguageModel

# ---------------------------------------------------------------------------------------------------
# The ingress: HTTP in, validated typed requests to the model deployment, JSON out.

api = FastAPI(title="BLIP-2 / InstructBLIP", description="caption, answer, match, embed, chat completions")


@api.exception_handler(RequestError)
async def _request_error(_: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status)


def _usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}


@serve.deployment
@serve.ingress(api)
class Gateway:
    def __init__(self, model: Any, config: dict[str, Any]) -> None:
        self.model = model
        self.config = from_dict(ServeConfig, config)
        self.limits = self.config.limits
        self.model_id = self.config.model.id
        self.created = int(time.time())

    async def _body(self, request: Request) -> bytes:
        limit = self.config.http.max_body_bytes
        too_large = RequestError(413, "body_too_large", f"the body is larger than the limit of {limit} bytes")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def _payload(self, request: Request, multipart: bool = True) -> tuple[dict[str, Any], bool]:
        """The JSON object or the multipart form (files as bytes) of a request, and whether it was a form."""
        allowed = ("application/json", "multipart/form-data") if multipart else ("application/json",)
        kind = require_media_type(request.headers.get("content-type"), allowed)
        body = await self._body(request)
        if kind == "application/json":
            return parse_json_body(body), False

        async def once():
            yield body
        try:
            form = await MultiPartParser(request.headers, once()).parse()
        except Exception as error:  # starlette raises its own MultiPartException for every malformed form
            raise RequestError(400, "invalid_form", f"malformed multipart body: {error}") from None
        data = {}
        for name, value in form.multi_items():
            data[name] = await value.read() if isinstance(value, UploadFile) else value
        return data, True

    async def _call(self, method: str, request: Any) -> Any:
        """One model call; a request whose replica died on the way is sent again (to a live one)."""
        for attempt in range(self.config.http.retries + 1):
            try:
                return await getattr(self.model, method).remote(request)
            except (RayActorError, ActorUnavailableError, ReplicaUnavailableError) as error:
                if attempt == self.config.http.retries:
                    raise RequestError(503, "replica_unavailable", f"no model replica could answer: {error}") from None
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _events(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """A streamed generation's events from the model deployment. A request whose replica died is
        sent again to a live one if no event had arrived yet; else a 503 ``replica_lost`` ends it (its
        text was partly sent)."""
        for attempt in range(self.config.http.retries + 1):
            stream = self.model.options(stream=True).generate_stream.remote(request)
            received = False
            try:
                async for item in stream:
                    received = True
                    yield item
                return
            except (RayActorError, ActorUnavailableError, ReplicaUnavailableError) as error:
                if received:
                    raise RequestError(503, "replica_lost", f"the model replica was lost mid-answer: {error}") from None
                if attempt == self.config.http.retries:
                    raise RequestError(503, "replica_unavailable", f"no model replica could answer: {error}") from None
                await asyncio.sleep(0.2 * (attempt + 1))
            finally:
                stream.cancel()  # no-op once it has ended; else (the client went away) the replica drops it

    async def _generate(self, request: GenerationRequest) -> GenerationResult:
        """A whole generation (from the running decode batch, or @serve.batch): one call, no events."""
        return await self._call("generate_text", request)

    async def _stream(self, request: GenerationRequest, chunks: TextChunks | ChatChunks) -> StreamingResponse:
        """Server-sent events of a generation. The first event is awaited here, so a request that no
        replica could start is still a plain 503 JSON error; later failures end the stream with an
        error event."""
        events = self._events(request)
        first = await anext(events)

        async def frames() -> AsyncIterator[str]:
            def frame(token_event: TokenEvent, items: list) -> str:  # one write per model event (a hop)
                return "".join(event(item) for item in items) + (DONE if token_event.result is not None else "")

            try:
                yield frame(first, [*chunks.start(), *chunks(first)])
                if first.result is None:
                    async for token_event in events:
                        if text := frame(token_event, chunks(token_event)):
                            yield text
            except RequestError as error:
                yield error_event(error)
            except Exception as error:  # noqa: BLE001 - the client sees why its stream stopped
                yield error_event(RequestError(500, "generation_failed", f"generation failed: {error}"))
            finally:
                await events.aclose()
        return StreamingResponse(frames(), media_type="text/event-stream")

    def _require_retrieval(self) -> None:
        if not self.config.model.retrieval:
            raise RequestError(501, "not_available", "this server has no retrieval (stage-1) model: "
                                                     "set model.retrieval in its config to enable /v1/match and /v1/embed")

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(page_html(), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        await self._call_health()
        return {"status": "ok", "model": self.model_id}

    async def _call_health(self) -> None:
        try:
            await self.model.check_health.remote()
        except Exception as error:  # noqa: BLE001 - any failure is "unhealthy", with its reason
            raise RequestError(503, "unhealthy", f"the model failed its health check: {error}") from None

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return models_list(self.model_id, self.created)

    @api.post("/v1/caption")
    async def caption(self, request: Request) -> Any:
        data, form = await self._payload(request)
        job = caption_request(data, self.limits, form)
        if stream_requested(data, form):
            return await self._stream(job, TextChunks(self.model_id, "caption"))
        result = await self._generate(job)
        return {"model": self.model_id, "caption": result.text, "finish_reason": result.finish_reason,
                "usage": _usage(result)}

    @api.post("/v1/answer")
    async def answer(self, request: Request) -> Any:
        data, form = await self._payload(request)
        job = answer_request(data, self.limits, form)
        if stream_requested(data, form):
            return await self._stream(job, TextChunks(self.model_id, "answer", {"instruction": job.instruction}))
        result = await self._generate(job)
        return {"model": self.model_id, "instruction": job.instruction, "answer": result.text,
                "finish_reason": result.finish_reason, "usage": _usage(result)}

    @api.post("/v1/match")
    async def match(self, request: Request) -> dict[str, Any]:
        data, form = await self._payload(request)
        self._require_retrieval()
        result = await self._call("match", match_request(data, self.limits, form))
        return {"model": self.model_id, **asdict(result)}

    @api.post("/v1/embed")
    async def embed(self, request: Request) -> dict[str, Any]:
        data, form = await self._payload(request)
        self._require_retrieval()
        result = await self._call("embed", embed_request(data, self.limits, form))
        return {"model": self.model_id, **asdict(result)}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        data, _ = await self._payload(request, multipart=False)
        chat = chat_request(data, self.limits, self.model_id)
        if chat.stream:
            return await self._stream(chat.generation, ChatChunks(self.model_id, chat.include_usage))
        return chat_completion(await self._generate(chat.generation), self.model_id)


# ---------------------------------------------------------------------------------------------------
# Building the application


def application(config: ServeConfig) -> serve.Application:
    """The bound application: the ingress over an autoscaled model deployment, options from ``config``."""
    replica, scaling = config.replica, config.autoscaling
    model = VisionLanguageModel.options(
        autoscaling_config=asdict(scaling),
        max_ongoing_requests=replica.max_ongoing_requests,
        ray_actor_options={"num_cpus": replica.num_cpus, "num_gpus": replica.num_gpus},
        health_check_period_s=replica.health_check_period_s,
        health_check_timeout_s=replica.health_check_timeout_s,
        graceful_shutdown_timeout_s=replica.graceful_shutdown_timeout_s,
    ).bind(to_dict(config))
    return Gateway.options(
        num_replicas=config.http.ingress_replicas, max_ongoing_requests=config.http.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": config.http.ingress_num_cpus},
    ).bind(model, to_dict(config))


def build_app(args: dict[str, Any]) -> serve.Application:
    """The builder for ``serve run pipelines.serve:build_app config=<yaml> [key=value ...]`` (and a
    ``serve deploy`` config's ``args``): ``config`` names the YAML, every other key overrides it."""
    args = dict(args)
    path = args.pop("config", str(CONFIG_DIR / DEFAULT_CONFIG))
    overrides = [f"{key}={value}" for key, value in args.items()]
    return application(load_config(ServeConfig, path, overrides))


app = build_app({})  # `serve run pipelines.serve:app` and `serve build pipelines.serve:app`: the toy config


# ---------------------------------------------------------------------------------------------------
# The job


def base_url(config: ServeConfig) -> str:
    return f"http://{config.http.host}:{config.http.port}{config.http.route_prefix.rstrip('/')}"


def check(config: ServeConfig) -> dict[str, Any]:
    """Call /healthz, /v1/models and /v1/caption once over HTTP; their answers."""
    import base64
    import io

    from PIL import Image

    url = base_url(config)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    body = json.dumps({"image": base64.b64encode(buffer.getvalue()).decode(), "max_new_tokens": 8}).encode()
    results = {}
    for name, request in (
        ("healthz", urllib.request.Request(f"{url}/healthz")),
        ("models", urllib.request.Request(f"{url}/v1/models")),
        ("caption", urllib.request.Request(f"{url}/v1/caption", body, {"Content-Type": "application/json"})),
    ):
        with urllib.request.urlopen(request, timeout=60) as response:
            results[name] = json.loads(response.read())
    return results


def serve_is_running() -> bool:
    """Whether Ray Serve already runs on the connected cluster (then it is not ours to shut down).
    ``serve.status()`` does not start Serve, and reports no proxy and no application until it runs."""
    status = serve.status()
    return bool(status.proxies or status.applications)


class _Stopped(Exception):
    """SIGTERM (`kill`, `ray job stop`, Kubernetes): stop as Ctrl-C does, in one line, without a traceback."""


def _stop(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM during the clean-up is ignored
    raise _Stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("blip2 serve", __doc__, DEFAULT_CONFIG)
    parser.add_argument("--address", default=None,
                        help="Ray address to join (default: RAY_ADDRESS, else start a local instance)")
    parser.add_argument("--check", action="store_true",
                        help="start the app, call /healthz, /v1/models and /v1/caption once, remove the app, exit")
    config, args = parse_config(parser, ServeConfig, argv)
    serve_environment()  # Serve's throughput mode for a Ray instance started here (RAY_SERVE_THROUGHPUT_OPTIMIZED=0: off)
    started_ray = init_ray(args.address or "")
    # After ray.init, which sets its own SIGTERM handler (sys.exit) and lets the core worker's fatal-signal
    # handler print "SIGTERM received" with stack frames: ours replaces both.
    previous_handler = signal.signal(signal.SIGTERM, _stop)
    start, outcome = time.perf_counter(), ""  # how it ended; empty: by an error (its traceback says it)
    owns_serve = not serve_is_running()  # a cluster's Serve may hold other apps: only ours is removed then
    try:
        serve.start(http_options={"host": config.http.host, "port": config.http.port})
        log(f"deploying {config.model.id} ({config.model.source}) as app {config.http.app_name!r} ...")
        serve.run(application(config), name=config.http.app_name, route_prefix=config.http.route_prefix)
        log(f"serving {config.model.id} at {base_url(config)}/ (a page to try it; POST /v1/caption, /v1/answer, "
            "/v1/match, /v1/embed, /v1/chat/completions; GET /v1/models, /healthz)")
        if args.check:
            for name, answer in check(config).items():
                log(f"{name}: {json.dumps(answer)}")
            outcome = "checked /healthz, /v1/models and /v1/caption"
            return 0
        while True:  # serve until interrupted
            time.sleep(3600)
    except KeyboardInterrupt:
        outcome = "stopped by Ctrl-C"
        return 0
    except _Stopped:
        outcome = "stopped by SIGTERM"
        return 0
    finally:
        serve.delete(config.http.app_name)
        if owns_serve:
            serve.shutdown()
        if started_ray:
            ray.shutdown()
        signal.signal(signal.SIGTERM, previous_handler)
        if outcome:
            log(f"done: served {config.model.id} ({config.model.source}) at {base_url(config)}/ for "
                f"{time.perf_counter() - start:.0f} s; {outcome}; app {config.http.app_name!r} removed")


if __name__ == "__main__":
    # Run the importable module's main, not __main__'s: Serve pickles deployment classes defined in __main__
    # by value, and their configs' type hints would then not resolve in the replicas.
    from pipelines.serve import main as _main

    raise SystemExit(_main())

"""The HTTP ingress of ``blip2 serve`` (``pipelines/serve.py`` builds the application): FastAPI in front of the
model deployment (``pipelines/serve_model.py``). It reads and validates every request and answers bad ones
with a 4xx JSON error before a model sees them, forwards the rest, streams server-sent events back.

Its replicas import this module, so it imports no torch and no transformers (they are the model replicas'):
measured on two cores, an ingress replica's imports take 1.4 CPU-seconds and 184 MB instead of 5.0 and 474
(``tests/blip2/test_light_imports.py`` keeps it so). The app is not routable sooner: the model replica's
load is the longer path (6.3-7.3 s to a /healthz answer either way).
"""

# No `from __future__ import annotations`: FastAPI reads the route methods' annotations (`request: Request`)
# and Serve's ingress wrapping hides the module globals that would resolve them as strings.
import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from blip2.config import from_dict
from blip2.serving.chat import chat_completion, chat_request, models_list
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
from blip2.serving.results import GenerationResult, TokenEvent
from blip2.serving.streaming import DONE, ChatChunks, TextChunks, error_event, event, stream_requested
from pipelines.serve_config import ServeConfig

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

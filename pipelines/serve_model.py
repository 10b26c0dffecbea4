"""The model deployment of the serving app: one replica holds one loaded model.

Captions and answers are generated with continuous batching (``replica.batching: continuous``): a
thread steps :class:`blip2.serving.decoding.ContinuousDecoder` while any request is in flight; a
streamed request's text goes to its stream as it is decoded (``generate_stream``), a plain one gets
its answer in one piece (``generate_text``). Beam search, which is not decoded step by step, runs in a
thread of its own beside the decode loop. With ``replica.batching: serve_batch`` captions and answers
go through ``@serve.batch`` (whole requests batched, the text sent when its batch is done), which is
also what matching and embeddings always use.
"""

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from blip2.config import from_dict
from blip2.serving.decoding import ContinuousDecoder, supports
from blip2.serving.requests import EmbedRequest, GenerationRequest, MatchRequest
from blip2.serving.results import EmbedResult, GenerationResult, MatchResult, TokenEvent
from blip2.serving.runtime import load_runtime
from pipelines.common import quiet_progress_bars
from pipelines.serve_config import ServeConfig



@dataclass
class _Sink:
    """Where a request's events go: a queue read on the event loop that serves the request."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    finished: bool = False  # its last event was taken

    def take(self, item: TokenEvent | Exception) -> TokenEvent:
        """An event read from the queue (an error of the decode loop is raised here)."""
        if isinstance(item, Exception):
            raise item
        self.finished = item.result is not None
        return item


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


@serve.deployment
class VisionLanguageModel:
    def __init__(self, config: dict[str, Any]) -> None:
        config = from_dict(ServeConfig, config)
        quiet_progress_bars()
        torch.set_num_threads(config.replica.torch_threads)
        settings = config.model
        device = "cuda" if config.replica.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.runtime = load_runtime(settings.source, settings.retrieval, settings.retrieval_tokenizer,
                                    settings.retrieval_image_processor, settings.runtime, device,
                                    getattr(torch, settings.dtype), settings.seed)
        if config.limits.max_new_tokens > self.runtime.max_new_tokens_supported():
            raise ValueError(f"limits.max_new_tokens {config.limits.max_new_tokens} does not fit the LLM's window; "
                             f"at most {self.runtime.max_new_tokens_supported()}")
        # The @serve.batch methods below take their sizes from the config here (ReplicaSettings holds the
        # only default): Serve's decorator reads literals at import time, before any config exists.
        for method in (self.generate, self.match, self.embed):
            method.set_max_batch_size(config.replica.max_batch_size)
            method.set_batch_wait_timeout_s(config.replica.batch_wait_timeout_s)
        self.runtime.health_check()
        self.decoder = None
        if config.replica.batching == "continuous":
            replica = config.replica
            self.decoder = ContinuousDecoder(self.runtime, replica.max_batch_size, replica.join_group,
                                             replica.join_wait_steps, replica.stream_interval_s)
            self._sinks: dict[int, _Sink] = {}
            self._sinks_lock = threading.Lock()  # a request's sink exists before its first event
            self._wake = threading.Event()
            threading.Thread(target=self._decode_loop, name="decode-loop", daemon=True).start()

    # -- continuous batching: a thread steps the decoder; each step's events go to their requests' ------
    # -- queues in one call per event loop, so a step never waits on the requests' consumers       ------

    def _decode_loop(self) -> None:
        while True:
            if not self.decoder.has_work():
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                events: list[TokenEvent | Exception] = self.decoder.step()
            except Exception as error:  # noqa: BLE001 - fail the requests in flight, keep serving new ones
                old = self.decoder
                self.decoder = ContinuousDecoder(self.runtime, old.max_batch_size, old.join_group, old.join_wait_steps,
                                                 old.stream_interval_s)
                with self._sinks_lock:
                    failed = list(self._sinks)
                self._deliver([(i, error) for i in failed])
                continue
            self._deliver([(e.request_id, e) for e in events])

    def _deliver(self, items: list[tuple[int, TokenEvent | Exception]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenEvent | Exception]]] = {}
        with self._sinks_lock:
            for request_id, item in items:
                sink = self._sinks.get(request_id)
                if sink is not None:  # else: cancelled meanwhile
                    by_loop.setdefault(sink.loop, []).append((sink.queue, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    @contextlib.asynccontextmanager
    async def _submitted(self, request: GenerationRequest, stream: bool) -> AsyncIterator[_Sink]:
        """``request`` in the decode loop, its events arriving on the sink's queue; leaving before its
        last event (the client went away) cancels it."""
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        with self._sinks_lock:
            request_id = self.decoder.submit(request, stream=stream)
            self._sinks[request_id] = sink
        self._wake.set()
        try:
            yield sink
        finally:
            with self._sinks_lock:
                del self._sinks[request_id]
            if not sink.finished:
                self.decoder.cancel(request_id)

    async def generate_text(self, request: GenerationRequest) -> GenerationResult:
        """A whole caption or answer: from the running decode batch, which sends this request no event
        before its last (nothing per token crosses to the ingress), or from @serve.batch."""
        if self.decoder is None:
            return await self.generate(request)
        if not supports(request.params):  # beam search: beside the decode batch, in a thread of its own
            return (await asyncio.to_thread(self.runtime.generate, [request]))[0]
        async with self._submitted(request, stream=False) as sink:
            return sink.take(await sink.queue.get()).result

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """The request's text as it is decoded (one event with the whole text under ``serve_batch``,
        and for beam search). The first piece of text and the last event leave at once; pieces in
        between leave at most every ``replica.stream_interval_s``, each holding every token decoded
        since the one before (each event is a hop through Ray and the HTTP proxy, which a replica
        decoding 16 requests cannot pay per token): the decode loop hands out only pieces that are due,
        so nothing here wakes per token. Events that queued up while this stream waited on its consumer
        leave as one. Closing the stream (the client went away) cancels the request."""
        if self.decoder is None or not supports(request.params):
            result = await self.generate_text(request)
            yield TokenEvent(0, result.text, result)
            return
        async with self._submitted(request, stream=True) as sink:
            while True:
                item = sink.take(await sink.queue.get())
                while item.result is None and not sink.queue.empty():
                    more = sink.take(sink.queue.get_nowait())
                    item = TokenEvent(item.request_id, item.text + more.text, more.result)
                if item.text or item.result is not None:
                    yield item
                if item.result is not None:
                    return

    def decoder_stats(self) -> dict[str, int | float]:
        """Requests decoding now, waiting to join, and cancelled so far (their clients went away); decode
        steps, the rows they decoded and their seconds; prefills, their newcomers and their seconds."""
        if self.decoder is None:
            return {}
        d = self.decoder
        return {"running": len(d.running), "waiting": len(d._waiting), "cancelled": d.cancelled,
                "steps": d.steps, "step_rows": d.step_rows, "step_seconds": d.step_seconds,
                "prefills": d.prefills, "prefill_rows": d.prefill_rows, "prefill_seconds": d.prefill_seconds}

    # -- @serve.batch: model calls run in a worker thread so that the event loop queues the next batch --

    @serve.batch
    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return await asyncio.to_thread(self.runtime.generate, requests)

    @serve.batch
    async def match(self, requests: list[MatchRequest]) -> list[MatchResult]:
        return await asyncio.to_thread(self.runtime.match, requests)

    @serve.batch
    async def embed(self, requests: list[EmbedRequest]) -> list[EmbedResult]:
        return await asyncio.to_thread(self.runtime.embed, requests)

    async def check_health(self) -> None:
        """Serve calls this periodically; a raise marks the replica unhealthy and replaces it."""
        await asyncio.to_thread(self.runtime.health_check)

"""The model deployment of the serving app: one replica holds one loaded model.

Captions and answers are generated with continuous batching (``replica.batching: continuous``): a
thread steps :class:`blip2.serving.decoding.ContinuousDecoder` while any request is in flight, and each
request's tokens go to its stream as they are decoded. With ``replica.batching: serve_batch`` they go
through ``@serve.batch`` (whole requests batched, the text sent when its batch is done), which is also
what matching and embeddings always use.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from blip2.config import from_dict
from blip2.serving.decoding import ContinuousDecoder, TokenEvent, supports
from blip2.serving.requests import EmbedRequest, GenerationRequest, MatchRequest
from blip2.serving.runtime import EmbedResult, GenerationResult, MatchResult, load_runtime
from pipelines.common import quiet_progress_bars
from pipelines.serve_config import ServeConfig



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
            self.decoder = ContinuousDecoder(self.runtime, config.replica.max_batch_size)
            self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
            self._streams_lock = threading.Lock()  # a request's queue exists before its first event
            self._wake = threading.Event()
            threading.Thread(target=self._decode_loop, name="decode-loop", daemon=True).start()

    # -- continuous batching: a thread steps the decoder and hands each event to its request's queue --

    def _decode_loop(self) -> None:
        while True:
            if not self.decoder.has_work():
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                events: list[TokenEvent | Exception] = self.decoder.step()
            except Exception as error:  # noqa: BLE001 - fail the requests in flight, keep serving new ones
                self.decoder = ContinuousDecoder(self.runtime, self.decoder.max_batch_size)
                with self._streams_lock:
                    failed = list(self._streams)
                self._deliver([(i, error) for i in failed])
                continue
            self._deliver([(e.request_id, e) for e in events])

    def _deliver(self, items: list[tuple[int, TokenEvent | Exception]]) -> None:
        with self._streams_lock:
            targets = [(self._streams.get(i), item) for i, item in items]
        for target, item in targets:
            if target is not None:  # else: cancelled meanwhile
                loop, queue = target
                loop.call_soon_threadsafe(queue.put_nowait, item)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """The request's token events as they are decoded (one event with the whole text under
        ``serve_batch``, and for beam search). Closing the stream (the client went away) cancels it."""
        if self.decoder is None or not supports(request.params):
            result = (await self.generate(request) if self.decoder is None
                      else (await asyncio.to_thread(self.runtime.generate, [request]))[0])
            yield TokenEvent(0, result.text, result)
            return
        queue: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            request_id = self.decoder.submit(request)
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                while not isinstance(item, Exception) and item.result is None and not queue.empty():
                    # Tokens that piled up while this stream waited leave as one event: each event costs
                    # a hop through Ray and the proxy, which a busy replica cannot pay per token.
                    later = queue.get_nowait()
                    item = later if isinstance(later, Exception) else TokenEvent(
                        request_id, item.text + later.text, later.result)
                if isinstance(item, Exception):
                    raise item
                finished = item.result is not None
                yield item
        finally:
            with self._streams_lock:
                del self._streams[request_id]
            if not finished:
                self.decoder.cancel(request_id)

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

"""Iteration-level (continuous) batching: requests join the running decode batch at the next step and
leave it when they finish, and every step's tokens are handed out as they are decoded.

transformers' ``generate`` decodes a batch that is fixed when it starts, so a request arriving while it
runs waits for the longest sequence in it; transformers' own continuous batching (``generate_batch``)
takes token ids only, not BLIP-2's projected query embeddings. :class:`ContinuousDecoder` therefore
drives the LLM itself, one forward per step over a KV cache (the LLM's ``cache``, ``past_key_values``
in older transformers):

1. **Join.** Waiting requests (up to ``max_batch_size`` running) are *prefilled* together: the vision
   encoder and the Q-Former (with the instruction, for InstructBLIP) run once on the newcomers' images,
   the projected queries replace the ``<image>`` tokens of their prompts, and one LLM forward over that
   prompt gives each its first token and its cache. The newcomers' cache is then stacked under the
   running one: the shorter of the two is left-padded with masked positions. A prefill has a large
   fixed cost (three model calls, whatever their batch), and every running request waits for it: so
   while others decode, newcomers join in groups of ``join_group`` or after ``join_wait_steps`` steps
   (measured on the larger toy preset, one thread, 16 requests in flight: one prefill costs about as
   much as a step of 16 rows, and joining one by one spends about a third of the time prefilling).
2. **Step.** One LLM forward of one token per running request. A decoder-only LLM (OPT) numbers
   positions from its attention mask, and an encoder-decoder one (T5) reads only distances between
   positions, so the padding a request gets from its batch-mates changes neither its positions nor
   what it attends to: its greedy tokens are those of ``generate`` on that request alone (up to float
   rounding in batched matmuls).
3. **Leave.** A request that produced its end-of-sequence token, reached its ``max_new_tokens`` or was
   cancelled (its client went away) is dropped from the cache, and columns that no running request
   uses any more are trimmed.

Decoding per request: greedy, or sampling (``temperature``, ``top_p``) from the request's own
generator, seeded with its ``seed``, so a sample does not depend on its batch-mates; ``min_new_tokens``
holds back the end of sequence. Beam search and repetition penalties are not iteration-level: callers
send those requests to :meth:`VisionLanguageRuntime.generate` (``supports`` says which), which may run
in another thread while this loop steps: a step does not take the runtime's lock, so a long beam search
slows the batch (they share the processor) but does not stop it.

Not thread-safe on its own: one thread calls :meth:`step`; :meth:`submit` and :meth:`cancel` may be
called from any thread (they only touch a locked queue).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from blip2.models.generation_params import GenerationParams
from blip2.models.instruct import encode_qformer_instructions, instruction_aware
from blip2.models.stage2 import encode_with_left_truncation, unwrap, with_image_tokens
from blip2.serving.requests import GenerationRequest
from blip2.serving.results import GenerationResult, TokenEvent
from blip2.serving.runtime import VisionLanguageRuntime


@dataclass
class _Sequence:
    """One running request."""

    id: int
    request: GenerationRequest
    prompt_ids: list[int]  # the LLM prompt (without the query positions)
    generator: torch.Generator | None  # sampling only
    stream: bool = True  # events as text is decoded (else only the last, with the whole text)
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # text handed out so far
    sent_at: float = 0.0  # when its last piece of text was handed out (time.monotonic)

    @property
    def params(self) -> GenerationParams:
        return self.request.params


def supports(params: GenerationParams) -> bool:
    """Whether a request with ``params`` can decode step by step here (else: ``runtime.generate``)."""
    return params.num_beams == 1 and params.repetition_penalty == 1.0 and params.num_return_sequences == 1


class ContinuousDecoder:
    """The decode loop over one runtime's generative model (see the module docstring)."""

    def __init__(self, runtime: VisionLanguageRuntime, max_batch_size: int = 16, join_group: int = 1,
                 join_wait_steps: int = 0, stream_interval_s: float = 0.0) -> None:
        if max_batch_size < 1 or join_group < 1 or join_wait_steps < 0 or stream_interval_s < 0:
            raise ValueError(f"need max_batch_size >= 1, join_group >= 1, join_wait_steps >= 0, stream_interval_s "
                             f">= 0; got {max_batch_size}, {join_group}, {join_wait_steps}, {stream_interval_s}")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.join_group = join_group
        self.join_wait_steps = join_wait_steps
        self.stream_interval_s = stream_interval_s
        self._held_steps = 0  # steps the oldest waiting request has been held back while others decode
        self.cancelled = 0  # requests dropped by cancel() before they finished
        # Where the loop's time goes: decode steps (and the rows they decoded), prefills (and their newcomers).
        self.steps = self.step_rows = self.prefills = self.prefill_rows = 0
        self.step_seconds = self.prefill_seconds = 0.0
        self.model = unwrap(runtime.bundle.model)
        self.llm = self.model.language_model
        self.tokenizer = runtime.bundle.tokenizer
        self.encoder_decoder = bool(self.model.config.text_config.is_encoder_decoder)
        self.eos = self.tokenizer.eos_token_id
        self._ids = itertools.count()
        self._queue_lock = threading.Lock()
        self._waiting: list[_Sequence] = []
        self._cancelled: set[int] = set()
        self.running: list[_Sequence] = []
        # The batch state: cache, masks (1 = a real position), each row's last token.
        self._cache: DynamicCache | EncoderDecoderCache | None = None
        self._mask: Tensor | None = None  # (B, L): the LLM's (decoder-only) or the decoder's positions
        self._encoder_states: Tensor | None = None  # (B, S, D): encoder-decoder only
        self._encoder_mask: Tensor | None = None  # (B, S)

    # -- the queue (any thread) ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest, stream: bool = True) -> int:
        """Queue ``request``; it joins the batch at a coming step (see :meth:`_joiners`). Its id names
        its events: if ``stream``, one per step it decodes (``stream_interval_s`` 0), else the first
        piece of text at once and later ones at most every ``stream_interval_s``, each with all the text
        decoded since; without ``stream`` only its last (its text decoded once)."""
        if not supports(request.params):
            raise ValueError("beam search and repetition penalties are not decoded step by step: "
                             "use the runtime's generate")
        runtime = self.runtime
        prompt = runtime.prompts([request])[0]
        prompt_ids = encode_with_left_truncation(self.tokenizer, [prompt],
                                                 runtime.max_text_length(request.params))[0]
        generator = None
        if request.params.do_sample:
            generator = torch.Generator(device=runtime.device)
            if request.seed is not None:
                generator.manual_seed(request.seed)
            else:
                generator.seed()  # a fresh seed, without reseeding torch's global generator
        sequence = _Sequence(next(self._ids), request, prompt_ids, generator, stream)
        with self._queue_lock:
            self._waiting.append(sequence)
        return sequence.id

    def cancel(self, request_id: int) -> None:
        """Drop a request (waiting or running) at the next step; it gets no more events."""
        with self._queue_lock:
            self._cancelled.add(request_id)

    def has_work(self) -> bool:
        with self._queue_lock:
            return bool(self.running or self._waiting)

    # -- the loop (one thread) ----------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Admit waiting requests, decode one token for every running one; the events of this step."""
        with self._queue_lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [s for s in self._waiting if s.id not in cancelled]
            self.cancelled += len(self._waiting) - len(waiting)
            self._waiting = waiting
        dropped = [i for i, s in enumerate(self.running) if s.id in cancelled]
        self.cancelled += len(dropped)
        self._drop(dropped)
        with self._queue_lock:
            joiners = self._joiners()
        events: list[TokenEvent] = []
        # Not under the runtime's lock: requests decoded outside the batch (beam search) run beside it.
        with torch.no_grad():
            if self.running:
                start, rows = time.perf_counter(), len(self.running)
                events += self._advance(self._decode_step())
                self.steps, self.step_rows = self.steps + 1, self.step_rows + rows
                self.step_seconds += time.perf_counter() - start
            if joiners:
                start = time.perf_counter()
                events += self._admit(joiners)
                self.prefills, self.prefill_rows = self.prefills + 1, self.prefill_rows + len(joiners)
                self.prefill_seconds += time.perf_counter() - start
        return events

    def _joiners(self) -> list[_Sequence]:
        """The waiting requests that join now (under the queue lock). Prefilling one costs about as
        much as several (the vision encoder, Q-Former and LLM calls have a fixed cost per call), and
        every running request waits for it; so while others decode, waiting requests join in groups of
        ``join_group``, or after ``join_wait_steps`` steps. With nothing running they join at once."""
        room = self.max_batch_size - len(self.running)
        if not self._waiting or room <= 0:
            return []
        if self.running and len(self._waiting) < self.join_group and self._held_steps < self.join_wait_steps:
            self._held_steps += 1
            return []
        joiners, self._waiting = self._waiting[:room], self._waiting[room:]
        self._held_steps = 0
        return joiners

    def _admit(self, joiners: list[_Sequence]) -> list[TokenEvent]:
        """Prefill the joiners, pick their first tokens, stack them under the running batch."""
        logits, cache, mask, encoder_states, encoder_mask = self._prefill(joiners)
        start = len(self.running)
        self.running += joiners
        if self._cache is None:
            self._cache, self._mask = cache, mask
            self._encoder_states, self._encoder_mask = encoder_states, encoder_mask
        else:
            self._cache = _stack_caches(self._cache, cache)
            self._mask = _stack_left_padded(self._mask, mask)
            if self.encoder_decoder:
                self._encoder_states = _stack_right_padded(self._encoder_states, encoder_states)
                self._encoder_mask = _stack_right_padded(self._encoder_mask, encoder_mask)
        return self._advance(logits, first_row=start)

    def _prefill(self, joiners: list[_Sequence]) -> tuple[Tensor, object, Tensor, Tensor | None, Tensor | None]:
        """Next-token logits (J, V) of the joiners, their cache and masks."""
        runtime, model = self.runtime, self.model
        device = runtime.device
        requests = [s.request for s in joiners]
        pixel_values = runtime.pixels([r.image for r in requests])
        pixel_values = pixel_values.to(model.vision_model.embeddings.patch_embedding.weight.dtype)
        if runtime.is_instruct:
            qformer_ids, qformer_mask = encode_qformer_instructions(
                runtime.bundle.qformer_tokenizer, runtime.qformer_texts(requests), runtime.qformer_length,
                instruction_aware(model.config))
            features = model.get_image_features(pixel_values, qformer_input_ids=qformer_ids.to(device),
                                                qformer_attention_mask=qformer_mask.to(device))
        else:
            features = model.get_image_features(pixel_values)
        query_embeds = features.pooler_output  # (J, N, D): the projected queries
        config = model.config
        input_ids, attention_mask = with_image_tokens([s.prompt_ids for s in joiners], self.tokenizer.pad_token_id,
                                                      config.num_query_tokens, config.image_token_index)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        embeds = self.llm.get_input_embeddings()(input_ids)  # (J, N + T, D)
        image_positions = (input_ids == config.image_token_index).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_positions, query_embeds.to(embeds.dtype))
        if not self.encoder_decoder:
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, cache=DynamicCache(),
                           use_cache=True)
            return out.logits[:, -1].float(), out.cache, attention_mask, None, None
        encoder_states = self.llm.get_encoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        start = torch.full((len(joiners), 1), self._decoder_start(), dtype=torch.long, device=device)
        decoder_mask = torch.ones_like(start)
        out = self.llm(encoder_outputs=(encoder_states,), attention_mask=attention_mask, decoder_input_ids=start,
                       decoder_attention_mask=decoder_mask, cache=EncoderDecoderCache(DynamicCache(), DynamicCache()),
                       use_cache=True)
        return out.logits[:, -1].float(), out.cache, decoder_mask, encoder_states, attention_mask

    def _decoder_start(self) -> int:
        start = self.llm.generation_config.decoder_start_token_id
        return self.llm.config.decoder_start_token_id if start is None else start

    def _decode_step(self) -> Tensor:
        """One forward of every running request's last token: next-token logits (B, V)."""
        last = torch.tensor([[s.tokens[-1]] for s in self.running], dtype=torch.long, device=self.runtime.device)
        self._mask = torch.cat([self._mask, torch.ones_like(last)], 1)
        if not self.encoder_decoder:
            out = self.llm(input_ids=last, attention_mask=self._mask, cache=self._cache, use_cache=True)
        else:
            out = self.llm(encoder_outputs=(self._encoder_states,), attention_mask=self._encoder_mask,
                           decoder_input_ids=last, decoder_attention_mask=self._mask, cache=self._cache,
                           use_cache=True)
        self._cache = out.cache
        return out.logits[:, -1].float()

    def _advance(self, logits: Tensor, first_row: int = 0) -> list[TokenEvent]:
        """Choose the next token of rows ``first_row..`` from their logits, emit text, retire the finished."""
        rows = self.running[first_row:]
        chosen = self._choose(logits, rows)
        events, finished = [], []
        now, interval = time.monotonic(), self.stream_interval_s
        for offset, (sequence, token) in enumerate(zip(rows, chosen, strict=True)):
            sequence.tokens.append(token)
            stopped = token == self.eos
            done = stopped or len(sequence.tokens) >= sequence.params.max_new_tokens
            if done:
                events.append(self._event(sequence, stopped))
                finished.append(first_row + offset)
            elif sequence.stream and (not interval or not sequence.sent or now - sequence.sent_at >= interval):
                # A piece is due: every step, or the first text, or the interval is over. Text is decoded
                # only then (decoding every row's whole text at every step costs the loop time).
                event = self._event(sequence, None)
                if event.text:
                    sequence.sent_at = now
                if event.text or not interval:
                    events.append(event)
        self._drop(finished)
        return events

    def _choose(self, logits: Tensor, rows: Sequence[_Sequence]) -> list[int]:
        """Greedy argmax, or a draw from each sampling row's own generator. logits (R, V)."""
        for i, sequence in enumerate(rows):
            if len(sequence.tokens) < sequence.params.min_new_tokens and self.eos is not None:
                logits[i, self.eos] = float("-inf")
        chosen = logits.argmax(-1).tolist()
        for i, sequence in enumerate(rows):
            if sequence.params.do_sample:
                chosen[i] = _sample(logits[i], sequence.params, sequence.generator)
        return chosen

    def _event(self, sequence: _Sequence, stopped: bool | None) -> TokenEvent:
        """The text since the last event; the result when ``stopped`` is not None (finished).

        Whitespace at the end is held back until a later token follows it, and a token that ends inside
        a multi-byte character waits for the rest, so the pieces add up exactly to the final text."""
        text = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True).strip()
        if stopped is None and text.endswith("\ufffd"):
            return TokenEvent(sequence.id, "")
        piece = text[len(sequence.sent):] if text.startswith(sequence.sent) else ""
        sequence.sent += piece
        if stopped is None:
            return TokenEvent(sequence.id, piece)
        prompt_tokens = self.model.config.num_query_tokens + len(sequence.prompt_ids)
        result = GenerationResult(sequence.sent, prompt_tokens, len(sequence.tokens), "stop" if stopped else "length")
        return TokenEvent(sequence.id, piece, result)

    def _drop(self, rows: list[int]) -> None:
        """Remove running rows from the batch and trim the columns nobody uses any more."""
        if not rows:
            return
        keep = [i for i in range(len(self.running)) if i not in set(rows)]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._encoder_states = self._encoder_mask = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        first = int(self._mask.any(0).nonzero()[0])  # leading columns that are padding in every row
        if first:
            self._mask = self._mask[:, first:]
            for layer in _self_attention_layers(self._cache):
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        if self.encoder_decoder:
            self._encoder_states, self._encoder_mask = self._encoder_states[index], self._encoder_mask[index]
            used = int(self._encoder_mask.any(0).nonzero()[-1]) + 1  # trailing columns that are padding everywhere
            self._encoder_states, self._encoder_mask = self._encoder_states[:, :used], self._encoder_mask[:, :used]
            for layer in self._cache.cross_attention_cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :used], layer.values[:, :, :used]


def _sample(logits: Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """A draw from softmax(logits / temperature), restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling). logits (V,)."""
    logits = logits / params.temperature
    if params.top_p < 1.0:
        order = logits.argsort(descending=True)
        probabilities = F.softmax(logits[order], -1)
        outside = probabilities.cumsum(-1) - probabilities >= params.top_p  # the mass before a token already suffices
        logits = logits.clone()
        logits[order[outside]] = float("-inf")
    probabilities = F.softmax(logits, -1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


# ---------------------------------------------------------------------------------------------------
# Stacking two batches' caches: (B, H, L, D) tensors per layer and (B, L) masks.


def _self_attention_layers(cache: DynamicCache | EncoderDecoderCache) -> list:
    return (cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache).layers


def _pad(tensor: Tensor, length: int, dim: int, left: bool) -> Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    padding = tensor.new_zeros(shape)
    return torch.cat([padding, tensor] if left else [tensor, padding], dim)


def _stack_left_padded(a: Tensor, b: Tensor, dim: int = 1) -> Tensor:
    length = max(a.shape[dim], b.shape[dim])
    return torch.cat([_pad(a, length, dim, True), _pad(b, length, dim, True)])


def _stack_right_padded(a: Tensor, b: Tensor, dim: int = 1) -> Tensor:
    length = max(a.shape[dim], b.shape[dim])
    return torch.cat([_pad(a, length, dim, False), _pad(b, length, dim, False)])


def _stack_layers(running: list, joining: list, stack) -> None:
    for layer, new in zip(running, joining, strict=True):
        layer.keys = stack(layer.keys, new.keys, dim=2)
        layer.values = stack(layer.values, new.values, dim=2)


def _stack_caches(running: DynamicCache | EncoderDecoderCache, joining: DynamicCache | EncoderDecoderCache):
    """``running`` with ``joining``'s rows below it. Self-attention positions are aligned at the right
    (the newest token is last in every row), cross-attention (encoder) positions at the left."""
    _stack_layers(_self_attention_layers(running), _self_attention_layers(joining), _stack_left_padded)
    if isinstance(running, EncoderDecoderCache):
        _stack_layers(running.cross_attention_cache.layers, joining.cross_attention_cache.layers, _stack_right_padded)
    return running

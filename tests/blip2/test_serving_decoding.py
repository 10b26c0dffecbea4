"""Continuous batching against transformers' ``generate``: requests that join a running batch at different
steps, with prompts and lengths of their own, decode exactly as each does alone; sampling follows each
request's seed whatever its batch-mates; a cancelled request leaves without disturbing the others."""

import threading

import numpy as np
import pytest
from PIL import Image

from blip2.models.generation import GenerationParams
from blip2.serving.decoding import ContinuousDecoder, supports
from blip2.serving.requests import GenerationRequest
from blip2.serving.runtime import load_runtime
from blip2.toyworld.world import all_attributes, render

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_images(n: int) -> list[Image.Image]:
    attributes = all_attributes()[:: max(1, len(all_attributes()) // n)][:n]
    rng = np.random.default_rng(1)
    return [Image.fromarray(render(a, rng)) for a in attributes]


def run(decoder: ContinuousDecoder, arrivals: dict[int, list[GenerationRequest]]) -> dict[int, tuple[str, object]]:
    """Submit ``arrivals[step]`` before step ``step``; run to the end: id -> (joined text pieces, result)."""
    pieces: dict[int, list[str]] = {}
    results = {}
    order = []
    step = 0
    while step <= max(arrivals) or decoder.has_work():
        for request in arrivals.get(step, []):
            order.append(decoder.submit(request))
        for event in decoder.step():
            pieces.setdefault(event.request_id, []).append(event.text)
            if event.result is not None:
                assert event.request_id not in results, "a request finished twice"
                results[event.request_id] = event.result
        step += 1
        assert step < 200, "the decode loop does not end"
    return {i: ("".join(pieces[i]), results[i]) for i in order}


def requests_at_different_steps(images: list[Image.Image]) -> dict[int, list[GenerationRequest]]:
    forced = GenerationParams(max_new_tokens=9, min_new_tokens=9)
    return {
        0: [GenerationRequest(images[0], None, GenerationParams(max_new_tokens=12)),
            GenerationRequest(images[1], "what colour is the shape in this picture?", forced)],
        2: [GenerationRequest(images[2], "what shape?", GenerationParams(max_new_tokens=4, min_new_tokens=2),
                              history=(("user", "what colour is it?"), ("assistant", "red")))],  # a conversation
        3: [GenerationRequest(images[3], "where is the shape?", GenerationParams(max_new_tokens=14, min_new_tokens=14)),
            GenerationRequest(images[4], None, GenerationParams(max_new_tokens=3, min_new_tokens=3))],
        6: [GenerationRequest(images[5], "is there a large red circle on the left of the image?", forced)],
    }


@pytest.mark.parametrize("preset", ["toy-opt", "toy-t5", "toy-instruct-opt", "toy-instruct-t5"])
def test_greedy_tokens_equal_generate_alone_when_requests_join_at_different_steps(preset):
    runtime = load_runtime(preset)
    arrivals = requests_at_different_steps(toy_images(6))
    decoder = ContinuousDecoder(runtime, max_batch_size=4)  # the last arrival waits for a free row
    streamed = run(decoder, arrivals)
    requests = [r for step in sorted(arrivals) for r in arrivals[step]]
    alone = [runtime.generate([r])[0] for r in requests]
    for (text, result), expected, request in zip(streamed.values(), alone, requests, strict=True):
        assert result == expected, request
        assert text == expected.text  # the streamed pieces add up to the answer, nothing twice
        assert request.params.min_new_tokens <= result.completion_tokens <= request.params.max_new_tokens
    assert sum(r.completion_tokens for r in alone) > 40  # long enough to be a test of the cache
    assert decoder.running == [] and decoder._cache is None


def test_sampling_follows_each_requests_seed_whatever_its_batch_mates():
    runtime = load_runtime("toy-instruct-opt")
    images = toy_images(3)
    sampled = GenerationParams(max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95)
    target = GenerationRequest(images[0], "describe the image.", sampled, seed=11)
    alone = run(ContinuousDecoder(runtime), {0: [target]})
    crowded = run(ContinuousDecoder(runtime), {
        0: [GenerationRequest(images[1], None, sampled, seed=3)],
        1: [target, GenerationRequest(images[2], "what shape?", sampled, seed=4)]})
    other = GenerationRequest(images[0], "describe the image.", sampled, seed=12)
    other_seed = run(ContinuousDecoder(runtime), {0: [other]})
    assert list(alone.values())[0] == list(crowded.values())[1]
    assert list(alone.values())[0][0] != list(other_seed.values())[0][0]


def test_a_cancelled_request_leaves_and_the_others_are_unchanged():
    runtime = load_runtime("toy-opt")
    images = toy_images(3)
    forced = GenerationParams(max_new_tokens=10, min_new_tokens=10)
    requests = [GenerationRequest(image, None, forced) for image in images]
    decoder = ContinuousDecoder(runtime)
    ids = [decoder.submit(r) for r in requests]
    seen: dict[int, list] = {i: [] for i in ids}
    for _ in range(3):
        for event in decoder.step():
            seen[event.request_id].append(event)
    decoder.cancel(ids[1])
    while decoder.has_work():
        for event in decoder.step():
            seen[event.request_id].append(event)
    assert len(seen[ids[1]]) == 3 and seen[ids[1]][-1].result is None  # no event after the cancel
    for i, request in zip((ids[0], ids[2]), (requests[0], requests[2])):
        assert seen[i][-1].result == runtime.generate([request])[0]


def test_newcomers_join_in_groups_while_others_decode_and_still_decode_as_alone():
    """join_group 2, join_wait_steps 3: a lone newcomer waits (at most 3 steps) while others decode; two
    waiting join at once; with nothing running a newcomer joins at once. Greedy output is unchanged."""
    runtime = load_runtime("toy-instruct-opt")
    images = toy_images(4)
    forced = GenerationParams(max_new_tokens=12, min_new_tokens=12)
    requests = [GenerationRequest(image, "what shape?", forced) for image in images]
    decoder = ContinuousDecoder(runtime, max_batch_size=4, join_group=2, join_wait_steps=3)
    first_step: dict[int, int] = {}
    events: dict[int, list] = {}
    plan = {0: [0], 1: [1], 6: [2, 3]}  # step -> requests submitted before it
    step, ids = 0, {}
    while step <= max(plan) or decoder.has_work():
        for index in plan.get(step, []):
            ids[decoder.submit(requests[index])] = index
        for event in decoder.step():
            first_step.setdefault(ids[event.request_id], step)
            events.setdefault(ids[event.request_id], []).append(event)
        step += 1
    assert first_step == {0: 0, 1: 4, 2: 6, 3: 6}  # alone: at once; one waiting: 3 steps; two: together
    for index, request in enumerate(requests):
        assert events[index][-1].result == runtime.generate([request])[0]
        assert "".join(e.text for e in events[index]) == events[index][-1].result.text


def test_a_request_not_streamed_gets_one_event_with_its_whole_text():
    runtime = load_runtime("toy-opt")
    request = GenerationRequest(toy_images(1)[0], None, GenerationParams(max_new_tokens=8, min_new_tokens=8))
    decoder = ContinuousDecoder(runtime)
    decoder.submit(request, stream=False)
    events = []
    while decoder.has_work():
        events += decoder.step()
    assert len(events) == 1 and events[0].result == runtime.generate([request])[0]
    assert events[0].text == events[0].result.text


def test_a_step_runs_while_the_runtime_is_busy_outside_the_batch():
    """Beam search runs through runtime.generate, under the runtime's lock, in another thread: the
    decode batch keeps stepping meanwhile (here the lock is simply held during a whole decode)."""
    runtime = load_runtime("toy-opt")
    request = GenerationRequest(toy_images(1)[0], None, GenerationParams(max_new_tokens=6, min_new_tokens=6))
    decoder = ContinuousDecoder(runtime)
    decoder.submit(request)
    results = []
    with runtime.lock:
        worker = threading.Thread(target=lambda: results.extend(
            e.result for _ in range(6) for e in decoder.step() if e.result is not None))
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "a decode step waited for the runtime's lock"
    assert results == runtime.generate([request])


def test_cancelled_requests_are_counted_once_whether_waiting_or_running():
    runtime = load_runtime("toy-opt")
    images = toy_images(3)
    forced = GenerationParams(max_new_tokens=10, min_new_tokens=10)
    decoder = ContinuousDecoder(runtime, max_batch_size=1)
    running, waiting, finished = (decoder.submit(GenerationRequest(i, None, forced)) for i in images)
    decoder.step()
    decoder.cancel(running)
    decoder.cancel(waiting)
    decoder.cancel(running)
    decoder.step()
    assert decoder.cancelled == 2 and [s.id for s in decoder.running] == [finished]
    while decoder.has_work():
        decoder.step()
    decoder.cancel(finished)  # too late: it had finished
    decoder.step()
    assert decoder.cancelled == 2


def test_beam_search_is_not_decoded_step_by_step():
    assert supports(GenerationParams()) and not supports(GenerationParams(num_beams=2))
    with pytest.raises(ValueError, match="beam"):
        ContinuousDecoder(load_runtime("toy-opt")).submit(
            GenerationRequest(toy_images(1)[0], None, GenerationParams(num_beams=2)))


def llm_flops_per_token(runtime) -> int:
    """2 multiply-adds per LLM weight a token passes through (the positions table is a lookup)."""
    llm = runtime.bundle.model.language_model
    return 2 * sum(p.numel() for name, p in llm.named_parameters() if "embed_positions" not in name)


def test_the_large_preset_costs_ten_times_the_toy_per_token_and_decodes_like_generate():
    toy, large = load_runtime("toy-instruct-opt"), load_runtime("toy-instruct-opt-large")
    assert llm_flops_per_token(large) >= 10 * llm_flops_per_token(toy)
    request = GenerationRequest(toy_images(1)[0], "what shape?", GenerationParams(max_new_tokens=8, min_new_tokens=8))
    (text, result), = run(ContinuousDecoder(large), {0: [request]}).values()
    assert result == large.generate([request])[0] and text == result.text


def test_streamed_pieces_after_the_first_wait_for_the_interval_and_hold_all_text_since():
    """stream_interval_s: the first piece of text leaves at once, later ones only once the interval is
    over (here: never before the end), the last event at once; the pieces still add up to the answer."""
    runtime = load_runtime("toy-opt")
    request = GenerationRequest(toy_images(1)[0], None, GenerationParams(max_new_tokens=12, min_new_tokens=12))
    every_step, spaced = ContinuousDecoder(runtime), ContinuousDecoder(runtime, stream_interval_s=3600.0)
    (text, result), = run(every_step, {0: [request]}).values()
    events = []
    spaced.submit(request)
    while spaced.has_work():
        events += spaced.step()
    first_text = next(i for i, e in enumerate(events) if e.text)
    assert events[first_text + 1:] == events[-1:] and events[-1].result == result  # nothing in between
    assert all(e.text for e in events) and "".join(e.text for e in events) == text == result.text
    with pytest.raises(ValueError, match="stream_interval_s"):
        ContinuousDecoder(runtime, stream_interval_s=-1)

"""Serving throughput and latency on Ray Serve: dynamic batching against ``max_batch_size=1``, and the
HTTP overhead over a direct in-process call of the same runtime.

    python benchmarks/serve.py [--requests 400] [--max-new-tokens 8] [--out FILE.json]

One local Ray instance, one Serve app at a time on loopback, the toy InstructBLIP preset on one model
replica (autoscaling pinned to 1 so that only batching differs). Both apps run side by side and are
measured in alternating rounds: ``/v1/answer`` requests (8 toy images, 4 instructions, greedy) at
concurrency 1, 4 and 16: requests/s, p50 and p99 latency.
The overhead figure is the p50 of an HTTP request at concurrency 1 on the unbatched app minus the p50 of
``VisionLanguageRuntime.generate`` on one request in this process — the code the replica runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import platform
import socket
import statistics
import time

import httpx
import numpy as np
import ray
import torch
from PIL import Image
from ray import serve

from blip2.config import load_config
from blip2.models.generation import GenerationParams
from blip2.serving.requests import GenerationRequest
from blip2.serving.runtime import load_runtime
from blip2.toyworld.world import all_attributes, render
from pipelines.common import CONFIG_DIR
from pipelines.serve import ServeConfig, application

CONCURRENCY = (1, 4, 16)
INSTRUCTIONS = ("what colour is the shape?", "what shape is it?", "where is the shape?", "describe the image.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toy_pngs(n: int = 8) -> list[bytes]:
    rng = np.random.default_rng(0)
    attributes = all_attributes()[:: len(all_attributes()) // n][:n]
    out = []
    for a in attributes:
        buffer = io.BytesIO()
        Image.fromarray(render(a, rng)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


async def run_load(url: str, bodies: list[dict], total: int, concurrency: int) -> tuple[list[float], float, int]:
    """``total`` POSTs to ``url``, ``concurrency`` at a time: latencies (ms), elapsed seconds, errors."""
    latencies: list[float] = []
    errors = 0
    queue = iter(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in queue:
            start = time.perf_counter()
            response = await client.post(url, json=bodies[i % len(bodies)])
            latencies.append((time.perf_counter() - start) * 1000)
            errors += response.status_code != 200

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        for body in bodies[:concurrency]:  # warm-up: connections, first batches
            await client.post(url, json=body)
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return latencies, elapsed, errors


def measure_apps(urls: dict[str, str], bodies: list[dict], requests: int, rounds: int) -> dict[str, dict]:
    """Every app at every concurrency, in alternating rounds (A, B, A, B, ...) so that a change in the
    machine's load (it is shared) hits both alike; figures pool the rounds."""
    results: dict[str, dict] = {name: {} for name in urls}
    for concurrency in CONCURRENCY:
        total = requests if concurrency > 1 else max(requests // 4, 10)
        pooled = {name: ([], 0.0, 0) for name in urls}
        for _ in range(rounds):
            for name, url in urls.items():
                latencies, elapsed, errors = asyncio.run(run_load(url, bodies, max(total // rounds, 1), concurrency))
                before = pooled[name]
                pooled[name] = (before[0] + latencies, before[1] + elapsed, before[2] + errors)
        for name, (latencies, elapsed, errors) in pooled.items():
            r = results[name][str(concurrency)] = {
                "requests_per_s": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99), "errors": errors, "requests": len(latencies)}
            print(f"  {name:10s} concurrency {concurrency:2d}: {r['requests_per_s']:7.1f} req/s  "
                  f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}", flush=True)
    return results


async def get_p50(url: str, total: int) -> float:
    """p50 of a GET that the ingress answers alone (proxy + ingress, no model hop), in ms."""
    latencies = []
    async with httpx.AsyncClient(timeout=60) as client:
        await client.get(url)
        for _ in range(total):
            start = time.perf_counter()
            (await client.get(url)).raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)
    return percentile(latencies, 50)


def direct_p50_ms(config: ServeConfig, images: list[bytes], max_new_tokens: int, repeats: int) -> float:
    """p50 of one request through ``VisionLanguageRuntime.generate`` in this process, one torch thread
    (as a replica runs it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(config.replica.torch_threads)
    try:
        runtime = load_runtime(config.model.source, "", settings=config.model.runtime, seed=config.model.seed)
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        params = GenerationParams(max_new_tokens=max_new_tokens)
        times = []
        for i in range(repeats + 3):
            start = time.perf_counter()
            runtime.generate([GenerationRequest(pil[i % len(pil)], INSTRUCTIONS[i % len(INSTRUCTIONS)], params)])
            if i >= 3:
                times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement at concurrency 4 and 16")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=16, help="of the batched app")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per concurrency")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # never join a running cluster
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    overrides = [f"http.port={port}", "replica.num_cpus=0.5", "http.ingress_num_cpus=0.1", "model.retrieval=",
                 "autoscaling.min_replicas=1", "autoscaling.max_replicas=1", "replica.max_ongoing_requests=64",
                 "autoscaling.target_ongoing_requests=32"]
    images = toy_pngs()
    bodies = [{"image": base64.b64encode(images[i % len(images)]).decode(), "max_new_tokens": args.max_new_tokens,
               "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)]} for i in range(32)]
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                     "max_new_tokens": args.max_new_tokens, "apps": {}}
    urls = {}
    try:
        for name, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
            config = load_config(ServeConfig, CONFIG_DIR / "serve_toy.yaml",
                                 [*overrides, f"replica.max_batch_size={batch}", f"http.app_name={name}"])
            serve.run(application(config), name=name, route_prefix=f"/{name}")
            urls[name] = f"http://127.0.0.1:{port}/{name}/v1/answer"
        print(f"both apps up (max_batch_size {args.max_batch_size} and 1); {args.rounds} alternating rounds", flush=True)
        results["apps"] = measure_apps(urls, bodies, args.requests, args.rounds)
        ingress_only = asyncio.run(get_p50(f"http://127.0.0.1:{port}/unbatched/v1/models", max(args.requests // 4, 10)))
        direct = direct_p50_ms(config, images, args.max_new_tokens, repeats=max(args.requests // 4, 10))
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    top = str(CONCURRENCY[-1])
    batched, unbatched = results["apps"]["batched"], results["apps"]["unbatched"]
    results["batching_speedup_at_16"] = batched[top]["requests_per_s"] / unbatched[top]["requests_per_s"]
    results["direct_p50_ms"] = direct
    results["http_p50_ms"] = unbatched["1"]["p50_ms"]
    results["http_overhead_p50_ms"] = unbatched["1"]["p50_ms"] - direct
    results["ingress_only_p50_ms"] = ingress_only
    print(f"batching speed-up at concurrency {top}: {results['batching_speedup_at_16']:.2f}x (goal >= 3x)")
    print(f"HTTP overhead p50: {results['http_overhead_p50_ms']:.1f} ms (HTTP {results['http_p50_ms']:.1f} ms, "
          f"in-process {direct:.1f} ms; goal <= 15 ms); proxy + ingress alone (GET /v1/models): "
          f"{results['ingress_only_p50_ms']:.1f} ms")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()

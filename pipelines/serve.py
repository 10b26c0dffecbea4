"""``blip2 serve``: BLIP-2 / InstructBLIP on Ray Serve, with autoscaled, dynamically batched replicas.

    python -m pipelines.serve [--config pipelines/configs/serve_toy.yaml] [key=value ...] [--check]
    serve run pipelines.serve:build_app config=pipelines/configs/serve_toy.yaml [model.source=DIR ...]
    serve deploy pipelines/configs/serve_deploy.yaml        # on a running cluster (`ray start --head`)

Two deployments. ``Gateway`` (``pipelines/serve_gateway.py``) is the FastAPI ingress: it reads and validates
every request (:mod:`blip2.serving.requests`, :mod:`blip2.serving.chat`) and answers bad ones with a 4xx
JSON error before a model sees them. ``VisionLanguageModel`` (``pipelines/serve_model.py``) holds the model
(loaded once per replica); it autoscales between ``autoscaling.min_replicas`` and ``max_replicas`` on
ongoing requests. It generates with
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

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import ray
from ray import serve

from blip2.config import load_config, to_dict
from pipelines.common import CONFIG_DIR, init_ray, job_parser, log, parse_config, serve_environment
from pipelines.serve_config import (  # noqa: F401 - re-exported: the job's config is imported from here
    DEFAULT_CONFIG,
    AutoscalingSettings,
    HttpSettings,
    ModelSettings,
    ReplicaSettings,
    ServeConfig,
)
from pipelines.serve_gateway import Gateway
from pipelines.serve_model import VisionLanguageModel

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

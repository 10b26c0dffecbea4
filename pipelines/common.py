"""What every job entrypoint shares: ``--config <yaml> [key=value ...]`` parsing into a typed config."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from blip2.config import ConfigError, load_config, to_dict

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def job_parser(prog: str, description: str, default_config: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the options every job takes."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are key=value pairs with dotted keys for nested sections, e.g. vision.steps=200.\n"
               "Use --print-config to see every key with its resolved value.",
    )
    default = str(CONFIG_DIR / default_config) if default_config else None
    parser.add_argument("--config", default=default, help=f"YAML config file (default: {default or 'none'})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def parse_config(parser: argparse.ArgumentParser, config_cls: type[T], argv: Sequence[str] | None,
                 adjust: Callable[[argparse.Namespace, list[str]], list[str]] | None = None
                 ) -> tuple[T, argparse.Namespace]:
    """Parse ``argv`` and load ``config_cls``; config errors exit with status 2 and a one-line reason.

    ``adjust`` may turn job-specific flags into extra overrides (e.g. ``--out DIR`` -> ``out=DIR``).
    """
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if adjust is not None:
        overrides = adjust(args, overrides)
    try:
        config = load_config(config_cls, args.config, overrides)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.print_config:
        json.dump(to_dict(config), sys.stdout, indent=2)
        sys.stdout.write("\n")
        parser.exit(0)
    return config, args


def log(message: str) -> None:
    """Progress output of long jobs: one flushed line each, so `ray job logs` shows it as it happens.

    Written to stdout directly, not with ``print``: on Ray Train workers ``print`` is patched to go through
    Train's logger, which reached the driver's output twice (every step line appeared twice)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def quiet_progress_bars() -> None:
    """Progress that reads well in a log. Off a terminal (``ray job logs``, CI, a redirected file) Ray Data
    2.60 logs its progress as plain lines instead of drawing bars (each operator's rows done / total, once
    every ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds: 30 here unless set), and transformers'
    weight-loading bars, which redraw many times a second, are turned off. Ray Data chooses by stdout; should
    stdout be a terminal and stderr, where bars go, not, its bars are turned off too. On a terminal both
    stay bars."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        return
    import ray.data
    from transformers.utils import logging as transformers_logging

    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "30")  # read when Ray Data first logs
    if sys.stdout.isatty():
        ray.data.DataContext.get_current().enable_progress_bars = False
    if not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()


def keep_data_order() -> None:
    """Every Ray Data dataset this process builds from now on yields its rows in the dataset's own order.

    Ray Data's default (``preserve_order=False``) passes blocks on as their tasks finish, so which records
    land in which materialised block, which feature-cache file and which CapFilt output row follows the
    machine's load: two runs of one seed then train on differently ordered data (measured: a 30-step stage 1
    twice, losses apart from step 1). With the order kept, the seed orders the data (block shuffle and each
    worker's local shuffle are seeded from it) and that run trained bit-identically on one worker. Not every
    run yet: two demo runs still differed in one feature-cache file's row order (README, "Reproducibility").
    Ray Train's ingest copies the option when the trainer is built (``DataConfig.default_ingest_options``).
    With several workers, which worker receives which block still follows who asks first. No cost seen at
    the toy configs (the 30-step run took 166-191 s either way on a loaded machine)."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True


# Ray Serve's throughput mode, for every Ray instance this project starts to serve (and, through the image
# cluster/Dockerfile builds, every node of the cluster manifests). Each Ray process reads these when it first
# imports Serve, so they must be in the environment before Ray starts (docs/serving.md, "Ray Serve's
# throughput mode").
SERVE_ENVIRONMENT = {
    # gRPC between the proxy and the deployments, user code and the router on the replica's event loop, the
    # garbage collector frozen after start-up, request logs buffered: about +20% tokens/s, measured
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ... without its direct ingress, an HTTP server on every ingress replica (ports 30000+) for an external
    # load balancer; clients here go through Serve's proxy. Ray 2.60 holds a direct-ingress replica open for
    # RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) when it stops, so serve.shutdown(), which waits
    # 30 s for the controller, returns while the controller still drains; the next serve.start() on that Ray
    # instance then attaches to the dying controller, whose deploys are ignored until it kills itself
    # ("ServeController ... killed by ray.kill").
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
}


def serve_environment(environ: dict | None = None) -> dict[str, str]:
    """Set those of ``SERVE_ENVIRONMENT`` that ``environ`` (default: this process's environment, which a Ray
    instance started from here inherits) does not set: one already set wins, so
    ``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` opts out. Returns the variables it set."""
    environ = os.environ if environ is None else environ
    added = {name: value for name, value in SERVE_ENVIRONMENT.items() if name not in environ}
    environ.update(added)
    return added


def know_own_cluster() -> None:
    """Ray worker processes' start-up hook (``worker_process_setup_hook``) for a local instance this project
    starts: the process's ``RAY_ADDRESS`` becomes its own cluster's GCS address.

    Ray's state API (``ray.util.state``), called with no address inside a worker, reads the address that the
    last ``ray start`` left in ``/tmp/ray/ray_current_cluster``, not the cluster the worker belongs to;
    ``ray.init(address="local")`` does not rewrite that file. Ray Train 2.60's placement-group cleaner asks
    the state API every second whether the run's controller lives: pointed at a stopped cluster, each call
    hangs to its 10 s timeout, and every training run then waits 12 s at its end for the cleaner to stop
    (measured: a 3-step stage 1 spent 12.7 s of its 23 s there); pointed at another live cluster, it asks
    that cluster about the controller; with two instances and no file it errs on "multiple active Ray
    instances" (docs/ray-and-transformers-traps.md, trap 12)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


# ``know_own_cluster`` for a Ray instance started here: every worker process of its jobs runs it.
OWN_CLUSTER_RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.{know_own_cluster.__name__}"}


def init_ray(address: str = "", num_cpus: int = 0, **options) -> bool:
    """Connect to the cluster at ``address`` — or at ``RAY_ADDRESS``, which ``ray job submit`` sets for its
    jobs — else start a fresh local instance (``num_cpus`` logical CPUs; 0: all), never silently joining a
    cluster that someone started on this machine with ``ray start``; its workers know their own cluster
    (:func:`know_own_cluster`). Does nothing when Ray is already initialised (a test, a notebook, an
    enclosing job). Returns whether this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        options.setdefault("runtime_env", OWN_CLUSTER_RUNTIME_ENV)
    ray.init(address=address or "local", num_cpus=None if address else num_cpus or None, **options)  # Ray
    return True

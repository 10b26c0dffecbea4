"""pipelines.common: progress in a log (off a terminal Ray Data keeps its progress, as plain lines every 30 s
— Ray 2.60 logs instead of drawing bars when stdout is not a terminal — and transformers' redrawing bars are
off), and the Serve environment a Ray instance started by the project gets (throughput mode, opt-out)."""

import io

import ray.data
from transformers.utils import logging as transformers_logging

from pipelines import common


def test_off_a_terminal_ray_data_logs_its_progress_every_30_s_and_transformers_bars_are_off(monkeypatch):
    monkeypatch.delenv("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", raising=False)
    monkeypatch.setattr(common.sys, "stdout", io.StringIO())  # a log file: not a terminal
    monkeypatch.setattr(common.sys, "stderr", io.StringIO())
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", True)
    try:
        common.quiet_progress_bars()
        assert context.enable_progress_bars  # Ray Data's own non-terminal progress: lines, not bars
        assert common.os.environ["RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"] == "30"
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
        common.os.environ.pop("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", None)


def test_serve_environment_sets_throughput_mode_unless_the_environment_says_otherwise():
    from pipelines.common import SERVE_ENVIRONMENT, serve_environment

    environ = {}
    assert serve_environment(environ) == SERVE_ENVIRONMENT == environ
    assert environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    opted_out = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    assert serve_environment(opted_out) == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    assert opted_out["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"


def test_workers_of_a_local_instance_know_their_own_cluster(ray_local):
    """Every worker process of the session's instance (started with ``OWN_CLUSTER_RUNTIME_ENV``, as
    ``init_ray`` starts one), down to a detached actor created by an actor as Ray Train's controller
    creates its placement-group cleaner, has ``RAY_ADDRESS`` = its own GCS, and Ray's address lookup
    (what the state API calls with no address) returns it, whatever the last ``ray start`` wrote down."""
    import os

    import ray

    own = ray.get_runtime_context().gcs_address

    def seen() -> tuple:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        return os.environ.get("RAY_ADDRESS"), canonicalize_bootstrap_address_or_die(None)

    @ray.remote(num_cpus=0)
    class Probe:
        def seen(self) -> tuple:
            return seen()

        def child_seen(self) -> tuple:
            child = Probe.options(lifetime="detached").remote()
            try:
                return ray.get(child.seen.remote())
            finally:
                ray.kill(child)

    probe = Probe.remote()
    try:
        assert ray.get(probe.seen.remote()) == (own, own)
        assert ray.get(probe.child_seen.remote()) == (own, own)
    finally:
        ray.kill(probe)

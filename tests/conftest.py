"""Shared fixtures: a small toy world written once per session, one local Ray instance, and the tests that
run in their own process started early (``early_process``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from blip2.toyworld.corpus import ToyWorldConfig, write_toyworld

SMALL_WORLD = ToyWorldConfig(seed=3, web_size=300, clean_size=60, val_size=40, test_size=40, novel_size=30,
                             shard_size=128)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small toy world on disk (WebDataset + Parquet), with its summary."""
    root = tmp_path_factory.mktemp("toyworld")
    return root, write_toyworld(SMALL_WORLD, root)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (starting one costs ~5 s and ~1 GB).

    More logical CPUs than the two cores: Ray Data read tasks must never be starved by actors
    (docs/ray-and-transformers-traps.md, the silent-deadlock trap). Serve runs on it as `blip2 serve` runs
    it: in Ray Serve's throughput mode, unless the environment says otherwise."""
    ray = pytest.importorskip("ray")
    from pipelines.common import OWN_CLUSTER_RUNTIME_ENV, serve_environment

    serve_environment()  # before Ray starts: its processes read it when they import Serve
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,  # never join a `ray start` cluster
             runtime_env=OWN_CLUSTER_RUNTIME_ENV)  # its workers know their cluster, not the `head` fixture's
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Tiny models on a small shared machine: intra-op threads cost far more in contention than they
    save (measured about 5x slower with the default thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------
# Tests whose work is one process of its own (a multi-node cluster, a benchmark that starts its own Ray
# instance, the demo submitted to a head of its own) declare its command with
# ``@pytest.mark.early_process(command=f)``, ``f(directory) -> argv`` (a keyword: a mark called with one
# bare function decorates that function instead). When the selected tests include one, its process starts
# as collection ends, at the lowest priority (nice 19, SCHED_IDLE), and runs beside the other tests, in the
# CPU they leave idle (they wait on processes, Ray and Serve); the test itself is moved to the end of the
# session and waits for it through the ``early_process`` fixture, then checks what it did. Selected alone,
# it runs at once.


def _lowest_priority() -> None:
    """In the early process's child before it runs: nice 19 and Linux's SCHED_IDLE policy, both inherited
    by everything it starts. Nice 19, not less: Ray adds its worker niceness (15) to its workers' inherited
    one, but its raylet, GCS and driver keep this process's, and at 10 they outranked the tests' own Ray
    workers (serve benchmark 29 -> 59 s). SCHED_IDLE: a test's thread that wakes up takes the CPU from it at
    once; at nice 19 alone it could wait out the background task's time slice, and torch's two-thread
    operations wait for their slowest thread (the in-process quality training took 130 s beside the
    submitted demo at nice 19, 88 s with SCHED_IDLE, 75 s without the demo)."""
    os.nice(19)
    with contextlib.suppress(AttributeError, OSError):  # not Linux: nice alone
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


# At SCHED_IDLE an early process gets no CPU at all while the tests keep both cores busy, for minutes at a
# time, and Ray's start-up waits are wall-clock: `ray start --head` gave up on its dashboard after its 60 s
# (the demo's head, beside the quality fixture and the submitted training jobs). The early process's test
# bounds it instead (its ``wait(timeout)``); a variable already set wins.
EARLY_ENVIRONMENT = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "1800"}


@dataclass
class EarlyProcess:
    directory: Path  # the command's own directory (it writes there), removed at the session's end
    process: subprocess.Popen
    log: Path  # its stdout and stderr
    started: float

    @classmethod
    def start(cls, command: Callable[[Path], list[str]]) -> EarlyProcess:
        directory = Path(tempfile.mkdtemp(prefix="early-"))
        log = directory / "log.txt"
        with log.open("w") as handle:
            # At the lowest priority: it should take the CPU the other tests leave idle, not slow them down.
            # Its own process group (stopping it stops what it started: a cluster's raylets, Ray's workers) but
            # not its own session: with the kernel's autogroup scheduling (sched_autogroup_enabled, on by default
            # in most distributions) a new session is a new group that gets as much CPU as the whole test
            # session, whatever its niceness (the first test beside the two early processes: 6 s alone, 44 s).
            process = subprocess.Popen(command(directory), stdout=handle, stderr=subprocess.STDOUT, text=True,
                                       env={**EARLY_ENVIRONMENT, **os.environ}, preexec_fn=_lowest_priority,
                                       process_group=0)
        return cls(directory, process, log, time.monotonic())

    def wait(self, timeout: float) -> tuple[int, str]:
        """Its exit code and output, once it ends; fails the test if it runs ``timeout`` s past its start."""
        try:
            code = self.process.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"still running {timeout:.0f} s after it started:\n" + self.log.read_text()[-4000:])
        return code, self.log.read_text()

    def stop(self) -> None:
        """Kill its process group: the process, and whatever it started and left running."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


_EARLY: dict[str, EarlyProcess] = {}


def _early(item) -> EarlyProcess:
    """The process of ``item`` (a test with an ``early_process`` marker), started on the first call."""
    if item.nodeid not in _EARLY:
        _EARLY[item.nodeid] = EarlyProcess.start(item.get_closest_marker("early_process").kwargs["command"])
    return _EARLY[item.nodeid]


def pytest_configure(config):
    config.addinivalue_line("markers", "early_process(command=f): the test's own process, started as collection "
                                       "ends (tests/conftest.py)")


def pytest_collection_modifyitems(items):
    """The tests that wait on an early process run last: by then it has had the whole session to finish."""
    items.sort(key=lambda item: item.get_closest_marker("early_process") is not None)  # stable: order kept


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for item in session.items:
        if item.get_closest_marker("early_process") is not None:
            _early(item)


def pytest_sessionfinish(session):
    for early in _EARLY.values():
        early.stop()
        shutil.rmtree(early.directory, ignore_errors=True)


@pytest.fixture
def early_process(request) -> EarlyProcess:
    """This test's process (its ``early_process`` marker), started early or, if it was not, now."""
    if request.node.get_closest_marker("early_process") is None:
        raise pytest.UsageError("the early_process fixture needs @pytest.mark.early_process(command=...)")
    return _early(request.node)

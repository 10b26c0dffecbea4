"""The one ``ray start --head`` of a test session, shared by every test that submits jobs to a cluster."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.common import SERVE_ENVIRONMENT

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def head(tmp_path_factory):
    """``ray start --head --block`` in its own process group, on its own ports (a Ray instance already on
    the machine is neither used nor disturbed): stopping it stops exactly its processes. Started once,
    when a test first asks for it (about 10 s), and stopped at the end of the session."""
    bin_dir = Path(sys.executable).parent
    env = {**SERVE_ENVIRONMENT, **os.environ,  # Serve as on the clusters' nodes (cluster/Dockerfile)
           "RAY_AUTH_MODE": "disabled",  # token auth is on by default (docs/ray-and-transformers-traps.md)
           # on SIGTERM a node first drains (up to 30 s, for Serve proxies to quiesce): nothing to drain at the
           # end of a test session, so the head stops at once (about 35 s less teardown)
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # the jobs' `python` is this environment's
    dashboard = free_port()
    log = (tmp_path_factory.mktemp("head") / "head.log").open("w")
    process = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=4", "--include-dashboard=true"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(process.pid, signal.SIGTERM)
        pytest.fail("the Ray head did not come up")
    yield address, env, bin_dir
    os.killpg(process.pid, signal.SIGTERM)  # ray start --block stops the processes it started
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def start_submit(head, *command: str) -> subprocess.Popen:
    """``ray job submit --working-dir . -- <command>`` to ``head``, started: the CLI streams the job's output
    and exits when the job ends (0 if it succeeded). Several may run at once; :func:`finish` each."""
    address, env, bin_dir = head
    return subprocess.Popen([str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                             "--", *command], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen, timeout: float = 800) -> str:
    """Wait for a :func:`start_submit`; the job must have succeeded. Its output."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"the job did not end in {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "succeeded" in stdout.lower(), stdout[-3000:]
    return stdout


def submit(head, *command: str, timeout: float = 800) -> str:
    """``ray job submit --working-dir . -- <command>`` to ``head``; the job must succeed. Its output."""
    return finish(start_submit(head, *command), timeout)

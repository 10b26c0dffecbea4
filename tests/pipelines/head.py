"""A ``ray start --head`` on loopback, on its own ports, for tests that submit jobs to a real cluster.

The session's shared head (the ``head`` fixture, ``tests/pipelines/conftest.py``) is one; run as a script,
this starts another, submits one command to it with ``ray job submit --working-dir .``, prints the job's
output and stops the head — a whole submitted run as one process of its own (``early_process``)::

    python tests/pipelines/head.py LOG_DIR -- python -m pipelines.demo out=... key=value ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # run as a script: `tests` (and `pipelines`) as this checkout has them
    sys.path.insert(0, str(ROOT))

from tests.ports import free_port  # noqa: E402


@dataclass
class Head:
    process: subprocess.Popen  # `ray start --head --block`, leader of its own process group
    address: str  # the dashboard's, for `ray job submit --address`
    gcs_address: str  # what its jobs' drivers connect to (their RAY_ADDRESS)
    env: dict  # what `ray job ...` calls need (token auth off, this environment's `python` first)
    bin_dir: Path
    temp_dir: Path  # Ray's session files and logs (kept after it stops, as in Ray's default /tmp/ray)

    @classmethod
    def start(cls, log: Path, timeout: float = 120) -> Head:
        """Started and answering ``ray job list``; its output goes to ``log``. Raises RuntimeError if it
        does not come up in ``timeout`` seconds."""
        from pipelines.common import SERVE_ENVIRONMENT

        bin_dir = Path(sys.executable).parent
        env = {**SERVE_ENVIRONMENT, **os.environ,  # Serve as on the clusters' nodes (cluster/Dockerfile)
               "RAY_AUTH_MODE": "disabled",  # token auth is on by default (docs/ray-and-transformers-traps.md)
               # on SIGTERM a node first drains (up to 30 s, for Serve proxies to quiesce): nothing to drain at the
               # end of a test session, so the head stops at once (about 35 s less teardown)
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # the jobs' `python` is this environment's
        dashboard, gcs = free_port(), free_port()
        # A temp dir of its own, not Ray's machine-wide /tmp/ray: a job's supervisor gives the job's driver
        # the GCS address it reads from `<temp dir>/ray_current_cluster`, which the last `ray start` with that
        # temp dir wrote. With the default, a cluster started on this machine after this head (another
        # test's head, a `ray.cluster_utils.Cluster`) received this head's jobs: their tasks failed there,
        # unable to fetch the job's working_dir package from that cluster's GCS (or worse, succeeded there)
        # (docs/ray-and-transformers-traps.md, trap 13). Short, under the system temp dir: Ray's socket paths
        # inside it must fit Linux's 107 bytes.
        temp_dir = Path(tempfile.mkdtemp(prefix="ray-head-"))
        with log.open("w") as handle:
            # Its own process group, so that stopping it stops exactly its processes; not a session of its own:
            # with the kernel's autogroup scheduling a new session competes as a whole with the test session.
            process = subprocess.Popen(
                [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                 f"--port={gcs}", f"--temp-dir={temp_dir}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                 f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                 "--num-cpus=4", "--include-dashboard=true"],
                env=env, stdout=handle, stderr=subprocess.STDOUT, process_group=0)
        head = cls(process, f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", env, bin_dir, temp_dir)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if process.poll() is not None:  # `ray start` gave up (its own start-up timeouts): no use waiting
                raise RuntimeError(f"the Ray head exited ({process.returncode}) while starting (Ray's logs: "
                                   f"{temp_dir}); the end of its log ({log}):\n{log.read_text()[-3000:]}")
            probe = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", head.address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                return head
            time.sleep(2)
        head.stop(timeout=0)
        raise RuntimeError(f"the Ray head did not come up in {timeout:.0f} s (Ray's logs: {temp_dir}); the end of "
                           f"its log ({log}):\n{log.read_text()[-3000:]}")

    def submit(self, *command: str) -> subprocess.Popen:
        """``ray job submit --working-dir . -- <command>``, started: the CLI streams the job's output and
        exits when the job ends (0 if it succeeded)."""
        return subprocess.Popen([str(self.bin_dir / "ray"), "job", "submit", "--address", self.address,
                                 "--working-dir", ".", "--", *command], cwd=ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (``ray start --block`` stops the processes it started), SIGKILL to the group after ``timeout``."""
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def main(argv: list[str]) -> int:
    """``LOG_DIR -- COMMAND...``: a head of its own, COMMAND submitted to it; the CLI's exit code."""
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    # An early process runs at the lowest priority (SCHED_IDLE, tests/conftest.py): while the tests keep both
    # cores busy it gets no CPU at all, and its head took over 120 s to answer; the test's own wait bounds it.
    head = Head.start(Path(argv[0]) / "head.log", timeout=1800)
    try:
        process = head.submit(*argv[2:])
        stdout, stderr = process.communicate()
        print(stdout, flush=True)
        print(stderr, file=sys.stderr, flush=True)
        if process.returncode:  # last, so that a failing test's message, the output's end, says where to look
            print(f"the job failed; Ray's logs for this head (kept): {head.temp_dir}", file=sys.stderr, flush=True)
        return process.returncode
    finally:
        head.stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""`blip2 serve` stopped with SIGTERM (`kill`, `ray job stop`, Kubernetes) shuts down cleanly: exit status 0,
its app removed, one summary line, and no stack dump (Ray's core worker prints "SIGTERM received" with
frames unless the job handles the signal itself). A real process on a fresh local Ray instance."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.ports import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_stops_the_server_in_one_line_without_a_stack_dump(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.serve", f"http.port={port}", "replica.num_cpus=0.5",
         "http.ingress_num_cpus=0.1", "autoscaling.max_replicas=1", "http.app_name=sigterm"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any(line.startswith("serving ") for line in seen):
            try:
                seen.append(lines.get(timeout=5))
            except queue.Empty:
                if process.poll() is not None:
                    break
        assert any(line.startswith("serving ") for line in seen), "".join(seen)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    reader.join(timeout=15)  # what is left in the pipe
    while not lines.empty():
        seen.append(lines.get())
    output = "".join(seen)
    assert process.returncode == 0, output
    assert "SIGTERM received" not in output and "Traceback" not in output, output
    summary = [line for line in output.splitlines() if line.startswith("done: ")]
    assert len(summary) == 1 and "stopped by SIGTERM" in summary[0] and "'sigterm' removed" in summary[0], output

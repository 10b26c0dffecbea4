"""Jobs (training, CapFilt, serving, the demo) run unchanged through ``ray job submit --working-dir . --
python -m pipelines.<job> ...`` against a real head started with ``ray start --head`` on loopback, on its
own ports (so a Ray instance already on the machine is neither used nor disturbed). Only the head this
test started is stopped."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """``ray start --head --block`` in its own process group: stopping it stops exactly its processes."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",  # token auth is on by default (docs/ray-and-transformers-traps.md)
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


def submit(head, *command: str) -> str:
    address, env, bin_dir = head
    result = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                             "--", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower(), result.stdout[-3000:]
    return result.stdout


def test_training_job_submits_and_succeeds(head, tmp_path):
    out = tmp_path / "runs"
    output = submit(head, "python", "-m", "pipelines.train", "stage1", f"storage_path={out}",
                    f"toyworld={tmp_path / 'world'}", "world.web_size=40", "world.clean_size=64", "world.val_size=10",
                    "world.test_size=32", "world.novel_size=10", "model.hidden_size=64", "model.num_layers=1",
                    "model.num_query_tokens=4", "optim.batch_size=16", "optim.warmup_steps=1", "optim.max_steps=3",
                    "checkpoint_every=3", "scaling.cpus_per_worker=0.5", "name=submitted")
    assert "[stage1] done" in output  # the job's own progress lines reach `ray job submit`
    report = json.loads((out / "submitted" / "report.json").read_text())
    assert report["steps"] == 3 and (out / "submitted" / "model" / "config.json").exists()


def test_capfilt_job_submits_and_succeeds(head, tmp_path, small_world):
    root, _ = small_world
    out = tmp_path / "capfilt"
    submit(head, "python", "-m", "pipelines.capfilt", f"input.path={root / 'webdataset' / 'web'}", f"output={out}",
           "captioner.num_captions=1", "captioner.max_new_tokens=6", "captioner.min_new_tokens=2",
           "filter.source=toy-stage1", "filter.threshold=0.5")
    report = json.loads((out / "report.json").read_text())
    assert report["invariant_holds"]
    counts = report["counts"]
    assert counts["input"] == counts["kept"] + counts["filtered"] + counts["rejected"] > 0


def test_serving_job_submits_deploys_answers_and_removes_its_app(head):
    port = free_port()
    output = submit(head, "python", "-m", "pipelines.serve", "--check", f"http.port={port}", "replica.num_cpus=0.5",
                    "http.ingress_num_cpus=0.1", "autoscaling.max_replicas=1", "http.app_name=submitted")
    assert f"serving blip2-toy-instruct-opt at http://127.0.0.1:{port}" in output
    assert '"status": "ok"' in output and '"caption":' in output  # /healthz and /v1/caption answered


def test_demo_job_submits_and_runs_the_whole_workflow_on_the_cluster(head, tmp_path):
    from tests.pipelines.test_demo import tiny  # the demo test's smallest budgets

    out = tmp_path / "demo"
    output = submit(head, "python", "-m", "pipelines.demo", *tiny(out, free_port()))
    assert "== results (held-out test split)" in output  # the results table reaches `ray job submit`
    results = json.loads((out / "report.json").read_text())["results"]
    counts = results["capfilt"]["counts"]
    assert counts["input"] == 160 == counts["kept"] + counts["filtered"] + counts["rejected"]
    assert {"stage1", "stage2", "instruct"} <= set(results) and results["serve"]["images"] == 2


def test_evaluate_job_submits_and_succeeds(head, tmp_path):
    from blip2.toyworld.corpus import ToyWorldConfig, write_toyworld

    world = tmp_path / "world"
    write_toyworld(ToyWorldConfig(web_size=4, clean_size=4, val_size=4, test_size=4, novel_size=4, parquet=False), world)
    output = submit(head, "python", "-m", "pipelines.evaluate", "task=gqa", "model=toy-instruct-opt",
                    f"toyworld={world}", f"out={tmp_path / 'gqa'}", "generation.max_new_tokens=3")
    assert "[evaluate] gqa done" in output
    metrics = json.loads((tmp_path / "gqa" / "metrics.json").read_text())["metrics"]
    assert metrics["num_questions"] == 4 * 6 and (tmp_path / "gqa" / "predictions.jsonl").exists()

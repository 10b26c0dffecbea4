"""Jobs (training, CapFilt, serving, evaluation) run unchanged through ``ray job submit --working-dir . --
python -m pipelines.<job> ...`` against the session's real head (``head`` in ``tests/pipelines/conftest.py``:
``ray start --head`` on loopback, on its own ports). The demo's submitted run is in ``test_demo.py``.

The four jobs are submitted together, as a team shares a cluster, and each test checks its own: most of a
small job's time is start-up (the job's driver, Ray Train's worker group, Serve), which overlaps (measured
on two cores: 77 s one after another, 49 s together; 57 s in a loaded CI run).

One more, submitted while Ray's machine-wide record of the latest cluster names another one (as it does
whenever a cluster starts on this machine after the head: another head, a ``ray.cluster_utils.Cluster``),
prints where its driver connects: the head it was submitted to (docs/ray-and-transformers-traps.md,
trap 13)."""

import contextlib
import json
import re
from pathlib import Path

import pytest

from tests.pipelines.conftest import finish
from tests.ports import free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@contextlib.contextmanager
def another_cluster_started_later():
    """What a ``ray start`` of another cluster on this machine does after the head's: Ray's record of the
    latest cluster in its default temp dir (``/tmp/ray/ray_current_cluster``) names an address that is not
    the head's (here one where nothing listens). Put back as it was afterwards."""
    from ray._private.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))
    before = record.read_text() if record.exists() else None
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("127.0.0.1:9")
    try:
        yield
    finally:
        if before is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(before)


@pytest.fixture(scope="module")
def jobs(head, ray_local, tmp_path_factory, small_world):
    """Every job of this module, submitted at once: name -> (its folder, the started ``ray job submit``);
    "address" -> (the output, the ended ``ray job submit``) of a job that prints its driver's ``RAY_ADDRESS``.

    ``ray_local`` (the session's instance, up anyway in a whole run): Ray's lookup reads the record only when
    it finds more than one GCS process on the machine; with the head's alone it takes that one."""
    root, _ = small_world
    train, capfilt, evaluate = (tmp_path_factory.mktemp(name) for name in ("train", "capfilt", "evaluate"))
    from blip2.toyworld.corpus import ToyWorldConfig, write_toyworld

    write_toyworld(ToyWorldConfig(web_size=4, clean_size=4, val_size=4, test_size=4, novel_size=4, parquet=False),
                   evaluate / "world")
    port = free_port()
    commands = {
        "train": (train, [
            "python", "-m", "pipelines.train", "stage1", f"storage_path={train / 'runs'}",
            f"toyworld={train / 'world'}", "world.web_size=40", "world.clean_size=64", "world.val_size=10",
            "world.test_size=32", "world.novel_size=10", "model.hidden_size=64", "model.num_layers=1",
            "model.num_query_tokens=4", "optim.batch_size=16", "optim.warmup_steps=1", "optim.max_steps=3",
            "checkpoint_every=3", "scaling.cpus_per_worker=0.5", "name=submitted",
            # from pixels: the feature cache's pass is the in-process tests'
            "feature_cache=false",
            # one small set, not the toy config's test + novel at 100 images each (an actor pool each)
            "eval=[{task: coco_retrieval, split: test, limit: 16}]"]),
        "capfilt": (capfilt, [
            "python", "-m", "pipelines.capfilt", f"input.path={root / 'webdataset' / 'web'}",
            f"output={capfilt / 'out'}", "captioner.num_captions=1", "captioner.max_new_tokens=6",
            "captioner.min_new_tokens=2", "filter.source=toy-stage1", "filter.threshold=0.5"]),
        "serve": (port, [
            "python", "-m", "pipelines.serve", "--check", f"http.port={port}", "replica.num_cpus=0.5",
            "http.ingress_num_cpus=0.1", "autoscaling.max_replicas=1", "http.app_name=submitted"]),
        "evaluate": (evaluate, [
            "python", "-m", "pipelines.evaluate", "task=gqa", "model=toy-instruct-opt", f"toyworld={evaluate / 'world'}",
            f"out={evaluate / 'gqa'}", "generation.max_new_tokens=3"]),
    }
    started = {}
    try:
        started.update({name: (where, head.submit(*command)) for name, (where, command) in commands.items()})
        # Then, with a decoy in the record, one that prints where its driver connects: once it has run, its
        # supervisor has read the record. (The four above start meanwhile; on a head that followed the record,
        # any that read the decoy would hang connecting to it: the first test below says why.)
        with another_cluster_started_later():
            probe = head.submit("python", "-c",
                                "import os; print('driver RAY_ADDRESS=' + os.environ['RAY_ADDRESS'])")
            started["address"] = (finish(probe, timeout=300), probe)
        yield started
    finally:  # no `ray job submit` outlives the module (its job ends on the head)
        for _, process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def test_jobs_run_on_the_cluster_they_were_submitted_to(jobs, head):
    """The driver's ``RAY_ADDRESS`` (set by the job's supervisor) is the head's own GCS, not the address in
    Ray's machine-wide record, which named another cluster when the job was submitted. (Ray writes a
    loopback host as the machine's address: the port says which GCS.)"""
    output, _ = jobs["address"]
    driver = re.search(r"^driver RAY_ADDRESS=(\S+):(\d+)$", output, re.MULTILINE)
    assert driver, output[-3000:]
    assert driver.group(2) == head.gcs_address.rsplit(":", 1)[1], output[-3000:]


def test_training_job_submits_and_succeeds(jobs):
    folder, process = jobs["train"]
    output = finish(process)
    assert "[stage1] done" in output  # the job's own progress lines reach `ray job submit`
    out = folder / "runs"
    report = json.loads((out / "submitted" / "report.json").read_text())
    assert report["steps"] == 3 and (out / "submitted" / "model" / "config.json").exists()
    assert report["eval"]["num_images"] == 16  # scored after training, in the submitted driver


def test_capfilt_job_submits_and_succeeds(jobs):
    folder, process = jobs["capfilt"]
    finish(process)
    report = json.loads((folder / "out" / "report.json").read_text())
    assert report["invariant_holds"]
    counts = report["counts"]
    assert counts["input"] == counts["kept"] + counts["filtered"] + counts["rejected"] > 0


def test_serving_job_submits_deploys_answers_and_removes_its_app(jobs):
    port, process = jobs["serve"]
    output = finish(process)
    assert f"serving blip2-toy-instruct-opt at http://127.0.0.1:{port}" in output
    assert '"status": "ok"' in output and '"caption":' in output  # /healthz and /v1/caption answered


def test_evaluate_job_submits_and_succeeds(jobs):
    folder, process = jobs["evaluate"]
    output = finish(process)
    assert "[evaluate] gqa done" in output
    metrics = json.loads((folder / "gqa" / "metrics.json").read_text())["metrics"]
    assert metrics["num_questions"] == 4 * 6 and (folder / "gqa" / "predictions.jsonl").exists()

"""`blip2 demo`, the README's main command, end to end: a small world and tiny budgets, every step for
real (Ray Data audit and CapFilt, five Ray Train runs, Ray Serve over HTTP). The whole workflow runs once,
submitted to a real cluster (``ray job submit --working-dir .`` to a ``ray start --head`` of its own), as
one process beside the session's other tests (``early_process``, tests/conftest.py: the submitted run is
the suite's costliest work, and most of it waits on start-ups); then a re-run in this process, on the
session's local Ray instance, reuses what is done and redoes only what a changed config touches (one run
of each kind)."""

import json
import sys
from pathlib import Path

import pytest
from transformers import Blip2ForImageTextRetrieval, InstructBlipForConditionalGeneration

from pipelines import demo
from pipelines.serve import serve_is_running
from tests.ports import free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

TRAIN_STEPS = {"bootstrap_filter": 4, "bootstrap_captioner": 3, "stage1": 4, "stage2": 3, "instruct": 3}


def tiny(out, port) -> list[str]:
    args = [f"out={out}", "world.web_size=160", "world.clean_size=96", "world.val_size=24", "world.test_size=32",
            "world.novel_size=10", "world.shard_size=64", f"serve.http.port={port}", "requests=2",
            "serve.replica.num_cpus=0.5", "serve.http.ingress_num_cpus=0.1", "bootstrap_captioner.eval=[{task: coco_captions, split: test, limit: 8}]",
            "stage2.eval=[{task: coco_captions, split: test, limit: 8}]",
            "instruct.eval=[{task: vqav2, split: test, limit: 12}]",
            # stage 1's three runs on test only (the toy config adds novel): each set starts its own actors;
            # 32 images (192 captions), not the config's 100: ITM re-ranks each query's top 16, and at 100 the
            # three runs' scoring took about a minute of the test
            "bootstrap_filter.eval=[{task: coco_retrieval, split: test, limit: 32}]",
            "stage1.eval=[{task: coco_retrieval, split: test, limit: 32}]",
            # 4 steps of 16 from pixels, not a feature cache over every record first (the demo's configs cache;
            # the cache itself is tested in test_train.py)
            "bootstrap_filter.feature_cache=false", "stage1.feature_cache=false"]
    for section, steps in TRAIN_STEPS.items():
        args += [f"{section}.optim.max_steps={steps}", f"{section}.optim.warmup_steps=1",
                 f"{section}.optim.batch_size=16", f"{section}.checkpoint_every={steps}",
                 f"{section}.scaling.cpus_per_worker=0.5", f"{section}.scaling.torch_threads=1"]
    return args


def submitted_demo(directory: Path) -> list[str]:
    """The early process: a head of its own, the demo submitted to it (tests/pipelines/head.py)."""
    return [sys.executable, str(Path(__file__).with_name("head.py")), str(directory), "--",
            "python", "-m", "pipelines.demo", *tiny(directory / "demo", free_port())]


@pytest.mark.early_process(command=submitted_demo)
@pytest.mark.timeout(1500)  # the wait below is bounded by its own timeout, from the process's start
def test_demo_submitted_runs_from_corpus_to_served_endpoint_then_reuses_its_steps_in_process(
        early_process, ray_local, capsys):
    code, printed = early_process.wait(timeout=2400)  # its output reaches `ray job submit`, then this log
    assert code == 0, printed[-4000:]
    assert "succeeded" in printed.lower(), printed[-4000:]
    out = early_process.directory / "demo"
    command = early_process.process.args
    args = command[command.index("pipelines.demo") + 1:]  # the submitted run's own, for the re-run below
    report = json.loads((out / "report.json").read_text())
    results = report["results"]

    assert results["audit"]["per_split"] == {"web": 160, "clean": 96, "val": 24, "test": 32, "novel": 10}
    assert results["audit"]["pixels_match_labels"] == 1.0
    capfilt = results["capfilt"]
    counts = capfilt["counts"]
    assert counts["input"] == 160 == counts["kept"] + counts["filtered"] + counts["rejected"]
    assert capfilt["threshold"] == results["calibrate"]["threshold"]  # chosen on val, then used on web
    assert results["calibrate"]["pairs"] == 2 * 24 and capfilt["filter_quality"]["records"] == 160
    for name in ("bootstrap_filter", "stage1_raw", "stage1"):
        assert results[name]["steps"] == TRAIN_STEPS.get(name, TRAIN_STEPS["stage1"])
        assert results[name]["eval"]["num_candidates"] == 32 and 0 <= results[name]["eval"]["t2i_r1_attribute"] <= 1
    assert results["stage2"]["eval"]["num_images"] == 8
    assert {"accuracy/held_in", "accuracy/held_out"} <= set(results["instruct"]["eval"])
    # the exports are transformers checkpoints, loaded here by transformers itself
    assert isinstance(InstructBlipForConditionalGeneration.from_pretrained(results["instruct"]["model"]),
                      InstructBlipForConditionalGeneration)
    assert isinstance(Blip2ForImageTextRetrieval.from_pretrained(results["stage1"]["model"]), Blip2ForImageTextRetrieval)
    served = results["serve"]
    assert served["images"] == 2 and len(served["exchanges"]) == 2
    for exchange in served["exchanges"]:
        assert isinstance(exchange["caption"], str) and isinstance(exchange["answer"], str)
        assert isinstance(exchange["chat"], str) and 0 <= exchange["match"]["true"]["itm_probability"] <= 1
    assert (out / "results.png").stat().st_size > 0
    assert "== results (held-out test split)" in printed and "clean + CapFilt web" in printed
    assert report["reused"] == []
    record = json.loads((out / "demo_run.json").read_text())  # the run's record, the README's schema
    assert record["lines"] == demo.results_lines(report)[2:] and record["reused"] == [] and record["wall_seconds"] > 0
    assert "demo done: " in printed
    for name in ("bootstrap_filter", "stage1", "stage2", "instruct"):  # each training job's time split
        assert results[name]["goodput"]["step_samples_per_s"] > 0

    # Again, in this process, with one budget changed: only instruction tuning (and the checks that always
    # run) runs again.
    args = [a for a in args if not a.startswith("instruct.optim.max_steps=")] + ["instruct.optim.max_steps=2"]
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())
    assert set(again["reused"]) == set(report["seconds"]) - {"instruct", "backbones", "serve"}
    assert again["results"]["instruct"]["steps"] == 2
    assert again["results"]["stage1"] == results["stage1"]
    assert "reusing" in printed and "demo done: " in printed.splitlines()[-1]
    assert again["results"]["serve"]["images"] == 2
    assert not serve_is_running()  # the demo started Serve, so it shut it down (a later app may want its own port)

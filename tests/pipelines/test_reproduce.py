"""``blip2 reproduce``: the quick run writes the claims report from real trials (trained in this process,
scored by ``blip2 evaluate``'s code) and resumes without rerunning a finished trial."""

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blip2.claims import CLAIMS, render_markdown
from blip2.toyworld.selection import SelectionError
from pipelines import cli, reproduce
from pipelines.reproduce import ReproduceConfig, trial_specs
from tests.benchmarks import load_script


def test_quick_run_reports_every_trial_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # --quick writes nothing to benchmarks/
    out = tmp_path / "quick"
    assert reproduce.main(["--quick", f"out={out}"]) == 0
    claims = json.loads((out / "claims.json").read_text())
    assert list(claims["claims"]) == ["C2", "C3"] and claims["seeds"] == [0, 1] and claims["wall_seconds"] > 0
    assert len(claims["trials"]) == 4 and claims["trials_run"] == 4  # C3's 2 arms x 2 seeds; C2 reads C3's recipe
    for claim_id, ranked_by in (("C2", ("t2i_r1_attribute", "t2i_r1_attribute_itc")),
                                ("C3", ("t2i_r1_attribute_itc",) * 2)):
        entry = claims["claims"][claim_id]
        assert entry["runnable"] and entry["seconds"] > 0
        assert len(entry["trials"]) == 4 and {t["seed"] for t in entry["trials"]} == {0, 1}
        assert entry["summary"]["verdict"] == "not enough seeds" and not entry["summary"]["holds"]  # 2 < 5
        for arm, metric in zip(CLAIMS[claim_id].arms, ranked_by):
            stats = entry["summary"]["arms"][arm.name]
            assert stats["test"]["n"] == stats["novel"]["n"] == 2 and stats["test"]["ci"] is not None
            for trial in (t for t in entry["trials"] if t["arm"] == arm.name):  # the value is the trial's figure
                record = json.loads((out / "trials" / f"{trial['key']}.json").read_text())
                assert trial["values"]["test"] == record["benchmarks"]["coco_retrieval/test"][metric]
                assert 0 <= trial["values"]["novel"] <= 1
        assert set(entry["summary"]["difference"]) == {"test", "novel"}
    c2, c3 = claims["claims"]["C2"], claims["claims"]["C3"]
    assert {t["key"] for t in c2["trials"]} < {t["key"] for t in c3["trials"]}  # one run serves both
    record = json.loads(next((out / "trials").glob("*.json")).read_text())
    assert record["config"]["optim"]["max_steps"] == 12 and record["config"]["eval"][0]["limit"] == 24
    assert record["commit"] == claims["commit"] and claims["trial_commits"] == [claims["commit"]]  # the code's version
    assert (out / "trials" / record["key"] / "model" / "config.json").is_file()
    text = (out / "CLAIMS.md").read_text()
    assert "Verdict: not enough seeds" in text and "Every trial" in text and "`loss.itg_weight=0`" in text
    assert not (tmp_path / "benchmarks").exists()

    # benchmarks/claims_val.py scores the same trials' models on `val` (the evidence for a claim that does not
    # hold on `test`), per arm and seed, with the paired difference; it trains and changes nothing
    val = load_script("claims_val").run(out, ["C3"], tmp_path / "claims_val.json")["claims"]["C3"]
    assert {arm: sorted(v) for arm, v in val["per_seed"].items()} == {"ITC+ITM+ITG": [0, 1], "ITC+ITM": [0, 1]}
    assert all(0 <= x <= 1 for v in val["per_seed"].values() for x in v.values()) and val["difference"]["n"] == 2
    assert json.loads((tmp_path / "claims_val.json").read_text())["split"] == "val"

    before = {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.json")}
    capsys.readouterr()
    assert reproduce.main(["--quick", f"out={out}"]) == 0  # resumed: nothing left to run
    assert "4 trials, 0 to run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.json")} == before
    resumed = json.loads((out / "claims.json").read_text())
    assert resumed["trials_reused"] == 4
    # the run's wall time is its invocations' that ran trials (this one only rewrote the report)
    assert [(i["trials_run"], i["finished"]) for i in resumed["invocations"]] == [(4, True)]
    assert resumed["total_wall_seconds"] == resumed["invocations"][0]["wall_seconds"] >= claims["wall_seconds"] - 0.1

    # a trial lost (as one in flight when a run is stopped): the next invocation runs it, and its time adds up
    lost = next(t["key"] for t in claims["claims"]["C3"]["trials"] if t["arm"] == "ITC+ITM" and t["seed"] == 1)
    (out / "trials" / f"{lost}.json").unlink()
    assert reproduce.main(["--quick", f"out={out}"]) == 0
    again = json.loads((out / "claims.json").read_text())
    assert [i["trials_run"] for i in again["invocations"]] == [4, 1] and again["trials_run"] == 1
    assert again["total_wall_seconds"] == pytest.approx(sum(i["wall_seconds"] for i in again["invocations"]))
    assert "over 2 invocations" in (out / "CLAIMS.md").read_text()


def test_a_stopped_invocation_keeps_its_time_up_to_its_last_finished_trial(tmp_path):
    first = reproduce.Invocations(tmp_path, time.time() - 100)
    first.update(3)  # after its third trial; then it is killed: no final update
    second = reproduce.Invocations(tmp_path, time.time() - 10)
    entries = second.update(2, finished=True)
    assert [(e["trials_run"], e["finished"]) for e in entries] == [(3, False), (2, True)]
    assert 99 <= entries[0]["wall_seconds"] < 110 and 9 <= entries[1]["wall_seconds"] < 20
    assert [json.loads(line) for line in (tmp_path / reproduce.INVOCATIONS).read_text().splitlines()] == entries
    text = render_markdown({"command": "c", "finished": "now", "wall_seconds": 10.0, "trials": [], "trials_run": 2,
                            "trials_reused": 0, "seeds": [0], "machine": "m", "verdict_rule": "r", "min_seeds": 5,
                            "claims": {}, "invocations": entries,
                            "total_wall_seconds": sum(e["wall_seconds"] for e in entries)})
    assert "over 2 invocations" in text and "stopped (the time to its last finished trial)" in text


@pytest.mark.slow
def test_stage2_and_instruct_trials_start_from_their_seeds_stage_before(tmp_path):
    """C4, C5 and C7 at --quick's budgets, one seed: stage 2 trains from the stage-1 recipe's trial, instruction
    tuning from stage 2's, the fresh-Q-Former arm from no stage-1 weights; C7's stage-2 arm is C4's trial
    scored on questions too. (About 20 s in this process; the slow tier, since CI's quick run covers stage 1.)"""
    out = tmp_path / "chain"
    assert reproduce.main(["--quick", f"out={out}", "claims=[C4,C5,C7]", "seeds=[0]"]) == 0
    claims = json.loads((out / "claims.json").read_text())
    assert len(claims["trials"]) == 5  # stage 1 recipe, stage 2 from it and fresh, instruct and its C5 ablation
    records = {key: json.loads((out / "trials" / f"{key}.json").read_text()) for key in claims["trials"]}
    by_stage = {}
    for record in records.values():
        by_stage.setdefault(record["stage"], []).append(record)
    stage1, = by_stage["stage1"]
    instruct, = [r for r in by_stage["instruct"] if r["config"]["qformer_instruction"]]
    unaware, = [r for r in by_stage["instruct"] if not r["config"]["qformer_instruction"]]
    assert unaware["upstream"] == instruct["upstream"]  # C5's arms differ in the switch alone
    c5 = claims["claims"]["C5"]
    assert c5["runnable"] and {t["arm"] for t in c5["trials"]} == {"instruction-aware", "instruction-unaware"}
    assert {r["upstream"] for r in by_stage["stage2"]} == {stage1["key"]}
    assert all(r["config"]["stage1"] == str(out / "trials" / stage1["key"]) for r in by_stage["stage2"])
    assert records[instruct["upstream"]]["config"]["qformer_from_stage1"]
    c4, c7 = claims["claims"]["C4"], claims["claims"]["C7"]
    assert {t["key"] for t in c7["trials"] if t["arm"] == "stage 2, prompted"} <= {t["key"] for t in c4["trials"]}
    assert {"coco_captions/test", "vqav2/test", "vqav2/novel"} <= set(records[instruct["upstream"]]["benchmarks"])
    for entry in (c4, c5, c7):
        assert entry["summary"]["verdict"] == "not enough seeds"
        assert all(0 <= t["values"]["test"] <= 1 for t in entry["trials"])


def test_a_claim_without_its_switch_is_reported_not_runnable(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.CLAIMS, "C8", dataclasses.replace(CLAIMS["C8"], needs="a switch not written yet"))
    out = tmp_path / "out"
    assert reproduce.main([f"out={out}", f"claims_dir={tmp_path / 'bench'}", "claims=[C8]"]) == 0
    claims = json.loads((tmp_path / "bench" / "claims.json").read_text())
    assert claims["trials"] == []  # nothing ran for it
    entry = claims["claims"]["C8"]
    assert not entry["runnable"] and entry["summary"]["verdict"] == "not runnable: needs a switch not written yet"
    assert "not runnable: needs a switch not written yet" in (tmp_path / "bench" / "CLAIMS.md").read_text()


def test_arms_are_overrides_of_the_stage_configs_and_chain_by_seed():
    specs, uses = trial_specs(ReproduceConfig(seeds=(0, 1)))
    by_use = {(u["claim"], u["arm"], u["seed"]): specs[u["key"]] for u in uses}
    assert {c for c, _, _ in by_use} == set(CLAIMS) | {"F1"}  # every claim runs, and the factor
    c3 = by_use["C3", "ITC+ITM", 1]
    assert c3["base"]["loss"]["itg_weight"] == 0 and c3["base"]["seed"] == 1
    assert by_use["C2", "ITC alone", 0] is by_use["C3", "ITC+ITM+ITG", 0]  # shared arms run once
    fresh = by_use["C4", "fresh Q-Former", 0]
    assert not fresh["base"]["qformer_from_stage1"]
    assert fresh["upstream"] == by_use["C3", "ITC+ITM+ITG", 0]["key"]  # stage 2 starts from stage 1's recipe
    assert by_use["C7", "stage 2, prompted", 1] is by_use["C4", "from stage 1", 1]
    assert by_use["C7", "instruction-tuned", 1]["upstream"] == by_use["C4", "from stage 1", 1]["key"]
    # C1's CapFilt arm is C6's nucleus arm; each trains on the CapFilt trial of its seed and decoding, which
    # captions with the seed's stage-2 recipe and filters with its stage-1 recipe (trained on clean)
    assert by_use["C1", "clean + CapFilt web", 1] is by_use["C6", "nucleus", 1]
    assert by_use["C1", "clean + raw web", 1]["data"] == ["clean", "web"] and by_use["C1", "clean + raw web", 1]["after"] == []
    for arm, decoding in (("nucleus", "nucleus"), ("beam search", "beam")):
        trial = by_use["C6", arm, 1]
        capfilt = specs[trial["capfilt"][decoding]]
        assert trial["data"] == ["clean", f"capfilt:{decoding}"] and trial["after"] == [capfilt["key"]]
        assert capfilt["stage"] == "capfilt" and capfilt["base"]["captioner"]["decoding"] == decoding
        assert capfilt["after"] == [by_use["C4", "from stage 1", 1]["key"], by_use["C3", "ITC+ITM+ITG", 1]["key"]]
        assert capfilt["base"]["captioner"]["seed"] == 1 and specs[capfilt["after"][1]]["base"]["train_split"] == "clean"
    assert by_use["C1", "clean + raw web", 0]["key"] != by_use["C3", "ITC+ITM+ITG", 0]["key"]  # the data is in the key
    # C8's ablation: stage 2 and instruction tuning on one LM build (whatever the seed), from the recipe's stage 1
    with_lm, without = by_use["C8", "LM pretrained with existence", 1], by_use["C8", "LM without existence", 1]
    assert with_lm is by_use["C5", "instruction-aware", 1] and not with_lm["backbones"]
    build = specs[without["backbones"]]
    assert build["stage"] == "backbones" and list(build["base"]["language"]["excluded_tasks"]) == ["existence"]
    assert build["base"]["language"]["steps"] == 3000  # the shipped set's LM config, but for the exclusion
    stage2 = specs[without["upstream"]]
    assert stage2["backbones"] == build["key"] and stage2["upstream"] == by_use["C3", "ITC+ITM+ITG", 1]["key"]
    assert by_use["C8", "LM without existence", 0]["backbones"] == build["key"]
    # F1: the shipped set is C5's recipe arm at every seed; each fresh LM build (seeds 1, 2, 3) at training seed 0
    f1 = {(u["arm"], u["seed"]): specs[u["key"]] for u in uses if u["claim"] == "F1"}
    assert f1["shipped set", 1] is by_use["C5", "instruction-aware", 1]
    assert sorted(arm for arm, seed in f1) == ["LM build seed 1", "LM build seed 2", "LM build seed 3"] + ["shipped set"] * 2
    for b in (1, 2, 3):
        build_b = specs[f1[f"LM build seed {b}", 0]["backbones"]]
        assert build_b["base"]["language"]["seed"] == b and not build_b["base"]["language"]["excluded_tasks"]
    # per seed: stage 1 x5 (recipe, no ITG, raw web, CapFilt nucleus, CapFilt beam), stage 2 x3 (recipe, fresh, on
    # the build), instruct x3 (recipe, instruction-unaware, on the build), CapFilt x2; C8's build; F1's three
    # builds with a stage 2 and an instruct trial each
    assert len({s["key"] for s in specs.values()}) == len(specs) == 2 * (5 + 3 + 3 + 2) + 1 + 3 * 3


def test_capfilt_and_lm_build_arms_run_on_what_their_own_trials_made(tmp_path):
    """C1, C6 and C8 end to end at tiny budgets, one seed, in this process: the recipes train (the filter,
    the captioner, the instruction-tuned model), CapFilt runs twice (nucleus, beam) over the web split, the
    arms train on clean + raw web and on clean + each CapFilt output; one LM build without `existence`,
    and C8's ablation tunes stage 2 and instructions on it."""
    from blip2.backbones.build import find_backbones, file_digests

    out = tmp_path / "harness"
    args = ["--quick", f"out={out}", "claims=[C1,C6,C8]", "seeds=[0]", "world.web_size=48", "world.clean_size=64",
            "eval_limit=8", "captioner.max_new_tokens=5", "captioner.batch_size=24",
            "build_overrides=[steps=3,warmup_steps=1,batch_size=8]",
            "stage1_overrides=[optim.max_steps=4,optim.warmup_steps=1,optim.batch_size=16,model.hidden_size=64,"
            "model.num_layers=1,model.image_text_hidden_size=32,model.num_query_tokens=4,itm_diagnostics=false,"
            "itm_eval_images=4,rerank_k=2]",
            "stage2_overrides=[optim.max_steps=3,optim.warmup_steps=1,optim.batch_size=16]",
            "instruct_overrides=[optim.max_steps=3,optim.warmup_steps=1,optim.batch_size=16]"]
    assert reproduce.main(args) == 0
    claims = json.loads((out / "claims.json").read_text())
    # stage 1: recipe + 3 arms; stage 2 recipe + on the build; CapFilt x2; instruct recipe + on the build; the build
    assert claims["trials_run"] == len(claims["trials"]) == 4 + 2 + 2 + 2 + 1
    records = {key: json.loads((out / "trials" / f"{key}.json").read_text()) for key in claims["trials"]}

    steps = {r["capfilt"]["decoding"]: r for r in records.values() if r["stage"] == "capfilt"}
    for decoding, step in steps.items():
        report = step["capfilt"]
        kept = json.loads((out / "trials" / step["key"] / "kept.json").read_text())
        assert report["input"] == 48 == report["kept"] + report["filtered"] and len(kept) == report["kept"]
        assert report["kept_captions"] == sum(map(len, kept.values())) == (report["web_captions_kept"]
                                                                           + report["synthetic_captions_kept"])
        assert 0 <= report["threshold"] <= 1 and report["calibration"]["pairs"] == 2 * 8  # chosen on val
        assert set(report["web_filter_quality"]) >= {"precision", "recall"}
        assert kept and all(1 <= len(c) <= 2 for c in kept.values())  # top_n 2 of the web text + 2 synthetic
        trained, = [r for r in records.values() if r["data"] == ["clean", f"capfilt:{decoding}"]]
        assert trained["after"] == [step["key"]] and trained["final_losses"]["loss"] > 0
    c6 = claims["claims"]["C6"]
    assert {c["report"]["decoding"] for c in c6["capfilt"]} == {"nucleus", "beam"}
    c6_chain = [r for r in records.values() if r["stage"] in ("capfilt", "stage2", "stage1") and not r["config"].get(
        "backbones") and r["data"] != ["clean", "web"]]
    assert c6["seconds"] == pytest.approx(sum(r["seconds"] for r in c6_chain))  # its trials, each counted once

    build, = [r for r in records.values() if r["stage"] == "backbones"]
    built, shipped = out / "trials" / build["key"], find_backbones()
    assert build["config"]["language"]["excluded_tasks"] == ["existence"]
    digests, shipped_digests = file_digests(built), file_digests(shipped.root)
    same = [p for p in digests if digests[p] == shipped_digests.get(p)]
    assert {p.split("/")[0] for p in same} >= {"vision", "qformer_tokenizer"}  # unchanged: only the LMs differ
    assert digests["opt/model.safetensors"] != shipped_digests["opt/model.safetensors"]
    assert digests["opt/tokenizer.json"] == shipped_digests["opt/tokenizer.json"]
    assert set(build["backbones"]) == {"opt", "t5"} and "answer_accuracy/existence" in build["backbones"]["opt"]
    on_build = [r for r in records.values() if r["config"].get("backbones") == str(built)]
    assert sorted(r["stage"] for r in on_build) == ["instruct", "stage2"]
    c8 = claims["claims"]["C8"]
    assert c8["builds"][0]["key"] == build["key"] and c8["summary"]["verdict"] == "reported"
    assert all(0 <= t["values"]["test"] <= 1 for c in ("C1", "C6", "C8") for t in claims["claims"][c]["trials"])
    text = (out / "CLAIMS.md").read_text()
    assert "kept captions (web / synthetic)" in text and "| existence |" in text


def test_a_trial_cannot_train_on_a_report_split(tmp_path):
    """The selection guard holds in a trial: no evaluation entry point is on its stack while it trains.
    (Run on a thread of its own: the guard admits the tests' own frames.)"""
    specs, _ = trial_specs(ReproduceConfig(claims=("C3",), seeds=(0,), stage1_overrides=("train_split=novel",)))
    spec = next(iter(specs.values()))
    resolved = reproduce.resolved_config(spec, tmp_path, threads=1)
    with ThreadPoolExecutor(1) as pool:  # its frames: concurrent.futures', then the trial's
        error = pool.submit(reproduce.run_trial, "stage1", resolved, 1).exception(timeout=120)
    assert isinstance(error, SelectionError), error
    assert "'novel' records are read only for reports" in str(error)


def test_help_and_bad_config_exit_with_a_reason(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reproduce", "--help"])
    assert exit_info.value.code == 0 and "blip2 reproduce" in capsys.readouterr().out
    for override in ("claims=[C99]", "seeds=[1,1]", "stage1_overrides=[loss.itg_weight=-1]"):
        with pytest.raises(SystemExit) as exit_info:
            reproduce.main([override])
        assert exit_info.value.code == 2, override
    assert "C99" in capsys.readouterr().err


CLUSTER_SCRIPT = '''
import collections, json, sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipelines import reproduce
from pipelines.common import OWN_CLUSTER_RUNTIME_ENV

tmp = Path(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})  # schedules only
nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
ray.init(address=cluster.address, runtime_env=OWN_CLUSTER_RUNTIME_ENV)  # its workers know this cluster
code = reproduce.main([f"out={tmp / 'out'}", "claims_dir=", "claims=[C3]", "seeds=[0,1]", "cpus_per_trial=1",
                       "world.web_size=0", "world.clean_size=64", "world.val_size=4", "world.test_size=16",
                       "world.novel_size=16", "eval_limit=16",
                       "stage1_overrides=[optim.max_steps=3,optim.warmup_steps=1,optim.batch_size=16,"
                       "model.hidden_size=64,model.num_layers=1,model.image_text_hidden_size=32,"
                       "model.num_query_tokens=4,itm_diagnostics=false,itm_eval_images=4,rerank_k=2]"])
trials = json.loads((tmp / "out" / "claims.json").read_text())["claims"]["C3"]["trials"]
print("RESULT " + json.dumps({"code": code, "per_node": collections.Counter(t["node"] for t in trials)}))
ray.shutdown()
cluster.shutdown()
'''


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_trials_spread_over_a_clusters_nodes(tmp_path):
    """Two one-CPU worker nodes (``ray.cluster_utils.Cluster``, in a process of its own: the session's
    Ray instance cannot also be a cluster): the four trials run as Ray tasks on both."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=850)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout + result.stderr)[-4000:]
    outcome = json.loads(lines[-1][len("RESULT "):])
    assert outcome["code"] == 0 and sum(outcome["per_node"].values()) == 4
    assert len(outcome["per_node"]) == 2, outcome  # both worker nodes ran trials (the head has no CPU)


def test_a_finished_trial_is_not_reused_once_its_backbones_change(monkeypatch):
    """A trial's key covers the backbone set's files: a rebuilt shipped set makes every trial new."""
    config = ReproduceConfig(claims=("C3", "C8"), seeds=(0,))
    before, _ = trial_specs(config)
    assert reproduce.backbones_digest() == reproduce.backbones_digest("")  # the shipped set, hashed once
    monkeypatch.setattr(reproduce, "backbones_digest", lambda path="": "another set")
    after, _ = trial_specs(config)
    assert len(before) == len(after) and not set(before) & set(after)


def test_reproduce_yaml_reruns_the_committed_full_run():
    """reproduce.yaml is the config of the run benchmarks/claims.json records (CLAIMS.md): running it again
    reruns those trials (same seeds, world and budgets: stage 1 for 300 steps of 64 with every ITM negative
    at random, the demo's recipe when it ran), whatever the demo's stage-1 recipe is now; only the output
    directory differs."""
    from blip2.config import load_config, to_dict

    config = load_config(ReproduceConfig, reproduce.CONFIG_DIR / "reproduce.yaml")
    assert len(config.seeds) >= config.min_seeds == 5
    recorded = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "claims.json").read_text())["config"]
    shipped = json.loads(json.dumps(to_dict(config)))
    assert {k: v for k, v in shipped.items() if k != "out"} == {k: v for k, v in recorded.items() if k != "out"}
    specs, uses = trial_specs(config)
    recipe = specs[next(u["key"] for u in uses if (u["claim"], u["arm"], u["seed"]) == ("C3", "ITC+ITM+ITG", 0))]
    assert (recipe["base"]["optim"]["max_steps"], recipe["base"]["optim"]["batch_size"]) == (300, 64)
    stage2 = specs[next(u["key"] for u in uses if (u["claim"], u["arm"]) == ("C4", "from stage 1"))]
    assert stage2["base"]["optim"]["max_steps"] == 120

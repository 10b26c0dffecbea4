"""The claims' trials scored again on `val`: where a claim does not hold on `test`, the evidence of why
comes from `val` (never from `test`), from the very models the verdict scored.

    python benchmarks/claims_val.py [--run runs/reproduce] [--claims C1,C3,C5] [--out benchmarks/claims_val.json]

For each chosen claim of the run's ``claims.json`` (``blip2 reproduce`` with ``out=--run``), every trial's
exported model is scored by ``blip2 evaluate``'s code (in this process, no Ray) on the toy world's ``val``
split with the claim's task, limit and prompt, and the claim's metric is read per arm: the arms' mean, sd
and 95% CI over seeds and their paired difference, as ``CLAIMS.md`` gives them on ``test``. For a claim
whose paper arm is instruction-aware (C5), each of that arm's models is also scored with its Q-Former given
no instruction (a copy of the export whose ``config.json`` says ``qformer_instruction: false``): when
taking the instruction away from the Q-Former changes nothing, the trained Q-Former does not use it, and
no instruction-unaware ablation can fall behind. Nothing is trained; the run's trials are read, not
changed. One JSON file (with the run's command, commit and seeds); a table per claim is printed.

benchmarks/claims_val.json is this over the full run; benchmarks/claims_val_c5_one_query.json over a C5
run with a one-query Q-Former (``--run runs/c5-q1 --claims C5``; its command is in the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPLIT = "val"


def score(stage: str, resolved: dict, model_dir: Path, out: Path) -> dict:
    """``{task/val: metrics}``: the trial's eval sets, each on `val` instead of its own split."""
    from blip2.config import from_dict
    from blip2.training.tasks import TASKS
    from pipelines.train_eval import evaluate_training_output

    config_cls, task_cls = TASKS[stage]
    config = from_dict(config_cls, resolved)
    sets = {(s.task, s.limit, s.prompt): dataclasses.replace(s, split=SPLIT) for s in config.eval}
    config = dataclasses.replace(config, eval=tuple(sets.values()), storage_path=str(out), name=model_dir.parent.name)
    backbones = task_cls(config).backbones
    return evaluate_training_output(config, model_dir, str(backbones.qformer_tokenizer), str(backbones.vision),
                                    num_actors=0)


def without_qformer_instruction(model_dir: Path, into: Path) -> Path:
    """A copy of an InstructBLIP export whose Q-Former is given no instruction (the LLM still gets it)."""
    copy = into / model_dir.parent.name / model_dir.name
    shutil.copytree(model_dir, copy, dirs_exist_ok=True)
    config = json.loads((copy / "config.json").read_text())
    config["qformer_instruction"] = False
    (copy / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copy


def summary(values: dict[str, dict[int, float]], paper: str, ablation: str) -> dict:
    from blip2.claims import mean_ci, paired_difference

    return {"arms": {arm: mean_ci(list(v.values())) for arm, v in values.items()},
            "difference": paired_difference(values[paper], values[ablation]), "per_seed": values}


def run(run_dir: Path, claim_ids: list[str], out_file: Path) -> dict:
    from blip2.claims import CLAIMS, _fmt

    claims = json.loads((run_dir / "claims.json").read_text())
    result = {"run": str(run_dir), "run_command": claims["command"], "run_commit": claims["commit"],
              "run_seeds": claims["seeds"], "split": SPLIT, "claims": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for claim_id in claim_ids:
            claim, entry = CLAIMS[claim_id], claims["claims"][claim_id]
            metric_of = {arm.name: claim.metric_of(arm) for arm in claim.arms}
            name = f"{claim.task}/{SPLIT}"
            values: dict[str, dict[int, float]] = {arm.name: {} for arm in claim.arms}
            probe: dict[int, float] = {}
            cache: dict[str, dict] = {}  # two arms may read one trial (C2)
            for trial in sorted(entry["trials"], key=lambda t: (t["arm"], t["seed"])):
                record = json.loads((run_dir / "trials" / f"{trial['key']}.json").read_text())
                model_dir = run_dir / "trials" / trial["key"] / "model"
                if trial["key"] not in cache:
                    cache[trial["key"]] = score(record["stage"], record["config"], model_dir, scratch / "scored")
                values[trial["arm"]][trial["seed"]] = cache[trial["key"]][name][metric_of[trial["arm"]]]
                print(f"[claims_val] {claim_id} {trial['arm']} seed {trial['seed']}: "
                      f"{values[trial['arm']][trial['seed']]:.3f}", flush=True)
                if record["stage"] == "instruct" and trial["arm"] == claim.arms[0].name and \
                        "qformer_instruction=false" in claim.arms[1].overrides:
                    copy = without_qformer_instruction(model_dir, scratch / "no-instruction")
                    probe[trial["seed"]] = score("instruct", record["config"], copy, scratch / "probe")[name][claim.metric]
                    print(f"[claims_val] {claim_id} {trial['arm']} seed {trial['seed']}, Q-Former without the "
                          f"instruction: {probe[trial['seed']]:.3f}", flush=True)
            paper, ablation = (arm.name for arm in claim.arms)
            row = {"metric": claim.metric, "task": claim.task, **summary(values, paper, ablation)}
            if probe:
                row["paper_arm_without_qformer_instruction"] = summary(
                    {paper: values[paper], "without": probe}, paper, "without")
            result["claims"][claim_id] = row
            print(f"{claim_id} on {SPLIT}: " + "; ".join(f"{arm} {_fmt(stat)}" for arm, stat in row["arms"].items())
                  + f"; difference {_fmt(row['difference'])}")
            if probe:
                print(f"{claim_id} on {SPLIT}, {paper} with and without the Q-Former's instruction: difference "
                      f"{_fmt(row['paper_arm_without_qformer_instruction']['difference'])}")
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[claims_val] wrote {out_file} in {result['seconds']:.0f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/claims_val.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "reproduce",
                        help="a blip2 reproduce out= directory (claims.json and trials/)")
    parser.add_argument("--claims", default="C1,C3,C5", help="comma-separated claim ids (default: C1,C3,C5)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "claims_val.json")
    args = parser.parse_args(argv)
    from blip2.claims import CLAIMS

    claim_ids = [c.strip() for c in args.claims.split(",") if c.strip()]
    unknown = [c for c in claim_ids if c not in CLAIMS]
    if unknown:
        parser.error(f"unknown claims {unknown}; known: {', '.join(CLAIMS)}")
    if not (args.run / "claims.json").is_file():
        parser.error(f"{args.run} has no claims.json: run `blip2 reproduce out={args.run}` first")
    run(args.run, claim_ids, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

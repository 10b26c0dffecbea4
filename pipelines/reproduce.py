"""``blip2 reproduce``: the papers' claims in miniature, each claim's arms x seeds as parallel Ray trials.

    blip2 reproduce                      # pipelines/configs/reproduce.yaml: every claim, its seeds
    blip2 reproduce --quick              # CI: 2 seeds, claims C2 and C3, small budgets, in this process
    blip2 reproduce seeds=[0,1,2,3,4,5,6,7] claims=[C3,C4]

The claims, their arms (a stage's toy config with overrides) and the verdict rule are in
``blip2/claims.py``. Each trial (a stage trained at one seed) is a Ray task spread over the cluster's
nodes (``in_process=true``: one after the other in this process) that trains in-process
(``blip2/training/trials.py``), exports the model and scores it on the toy world's ``test`` and ``novel``
splits with ``blip2 evaluate``'s code, in the same process (``num_actors=0``). A stage-2 trial starts from
the stage-1 recipe's trial of its seed, an instruction-tuning trial from the stage-2 recipe's; stages run
in that order. A finished trial is written to ``<out>/trials/<key>.json`` at once and never run again:
its key is the stage, the seed and a hash of its whole training config (with its upstream trial's key),
so an interrupted run resumes where it stopped and arms that claims share run once (a trial whose
evaluation sets grew, because a claim was added, runs again). At the end
``claims.json`` and ``CLAIMS.md`` (per claim: each arm's per-seed values, mean, sd and 95% CI on `test`
and `novel`, the paired difference, the verdict, the seconds its trials took; every trial) go to ``out``
and, unless ``claims_dir`` is empty, to ``claims_dir``. A claim whose switch does not exist yet is
reported as not runnable, with what it needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blip2.claims import CLAIMS, SPLITS, VERDICT_RULE, render_markdown, summarise
from blip2.config import ConfigError, from_dict, load_config, to_dict
from blip2.toyworld.corpus import ToyWorldConfig
from blip2.training.config import EvalSet
from blip2.training.tasks import MODEL_DIR, TASKS
from pipelines.common import CONFIG_DIR, init_ray, job_parser, log, parse_config, quiet_progress_bars
from pipelines.toyworld import ToyWorldJobConfig, ensure_toyworld

STAGE_YAML = {"stage1": "stage1_toy.yaml", "stage2": "stage2_toy.yaml", "instruct": "instruct_toy.yaml"}
STAGE_ORDER = ("stage1", "stage2", "instruct")
UPSTREAM = {"stage2": ("stage1", "stage1"), "instruct": ("stage2", "stage2")}  # stage -> (its stage before, field)
QUICK = ("out=runs/reproduce-quick", "claims_dir=", "seeds=[0,1]", "claims=[C2,C3]", "in_process=true",
         "world.web_size=0", "world.clean_size=128", "world.val_size=8", "world.test_size=24", "world.novel_size=24",
         "eval_limit=24", "stage1_overrides=[optim.max_steps=12,optim.warmup_steps=2,optim.batch_size=32,"
         "itm_diagnostics=false,itm_eval_images=8,rerank_k=4]",
         "stage2_overrides=[optim.max_steps=10,optim.warmup_steps=2,optim.batch_size=16]",
         "instruct_overrides=[optim.max_steps=10,optim.warmup_steps=2,optim.batch_size=16]")


@dataclass(frozen=True)
class ReproduceConfig:
    out: str = "runs/reproduce"  # toyworld/, trials/ (finished trials, never rerun), claims.json, CLAIMS.md
    claims_dir: str = "benchmarks"  # claims.json and CLAIMS.md also go here; empty: only to out
    claims: tuple[str, ...] = ()  # empty: every claim in blip2.claims.CLAIMS
    seeds: tuple[int, ...] = (0, 1)  # a full run lists >= min_seeds in its YAML; every trial is reported
    min_seeds: int = 5  # fewer: the verdict is "not enough seeds"
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)  # the trials' toy world (out/toyworld)
    stage1_overrides: tuple[str, ...] = ()  # on top of stage1_toy.yaml for every stage-1 trial (budgets)
    stage2_overrides: tuple[str, ...] = ()  # ... stage2_toy.yaml
    instruct_overrides: tuple[str, ...] = ()  # ... instruct_toy.yaml
    eval_limit: int = 0  # > 0: every claim's evaluation set cut to its first N images / questions
    in_process: bool = False  # run the trials one by one in this process instead of as Ray tasks
    cpus_per_trial: float = 1.0  # Ray resources of one trial
    threads_per_trial: int = 1  # torch intra-op threads of one trial

    def __post_init__(self) -> None:
        unknown = [c for c in self.claims if c not in CLAIMS]
        if unknown:
            raise ValueError(f"claims must name some of {', '.join(CLAIMS)}; unknown: {', '.join(unknown)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        if self.min_seeds < 2 or self.cpus_per_trial <= 0 or self.threads_per_trial < 1 or self.eval_limit < 0:
            raise ValueError("min_seeds must be >= 2, cpus_per_trial > 0, threads_per_trial >= 1, eval_limit >= 0")


def _stage_config(config: ReproduceConfig, stage: str, overrides: Sequence[str], seed: int, upstream: str):
    budget = {"stage1": config.stage1_overrides, "stage2": config.stage2_overrides,
              "instruct": config.instruct_overrides}[stage]
    loaded = load_config(TASKS[stage][0], CONFIG_DIR / STAGE_YAML[stage], [*budget, *overrides, f"seed={seed}"])
    # what the key hashes: the training config, its upstream trial by key (paths and eval sets come later)
    changes = {"world": config.world, "eval": (), "name": "", "storage_path": "", "toyworld": ""}
    if stage in UPSTREAM:
        changes[UPSTREAM[stage][1]] = upstream
    return dataclasses.replace(loaded, **changes)


def _add_trial(specs: dict, config: ReproduceConfig, stage: str, overrides: Sequence[str], seed: int) -> str:
    upstream = _add_trial(specs, config, UPSTREAM[stage][0], (), seed) if stage in UPSTREAM else ""
    base = to_dict(_stage_config(config, stage, overrides, seed, upstream))
    key = f"{stage}-seed{seed}-{hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:12]}"
    specs.setdefault(key, {"key": key, "stage": stage, "seed": seed, "upstream": upstream, "base": base, "eval": set()})
    return key


def trial_specs(config: ReproduceConfig) -> tuple[dict[str, dict], list[dict]]:
    """Every trial the runnable claims need (prerequisite trials included), by key, and every use of a
    trial by a claim's arm: ``{"claim", "arm", "seed", "key"}``. Arms equal across claims share a key."""
    specs: dict[str, dict] = {}
    uses = []
    for claim_id in config.claims or tuple(CLAIMS):
        claim = CLAIMS[claim_id]
        if claim.needs:
            continue
        limit = min(claim.limit or config.eval_limit, config.eval_limit or claim.limit)
        for arm in claim.arms:
            for seed in config.seeds:
                key = _add_trial(specs, config, arm.stage, arm.overrides, seed)
                specs[key]["eval"].add((claim.task, limit, claim.prompt))
                uses.append({"claim": claim_id, "arm": arm.name, "seed": seed, "key": key})
    return specs, uses


def resolved_config(spec: dict, out: Path, threads: int) -> dict:
    """A trial's whole config: its training config with where it runs and what it is scored on."""
    config_cls = TASKS[spec["stage"]][0]
    trial = from_dict(config_cls, spec["base"])
    changes = {"name": spec["key"], "storage_path": str(out / "trials"), "toyworld": str(out / "toyworld"),
               "scaling": dataclasses.replace(trial.scaling, torch_threads=threads),
               "eval": tuple(EvalSet(task, split=split, limit=limit, prompt=prompt)
                             for task, limit, prompt in sorted(spec["eval"]) for split in SPLITS)}
    if spec["stage"] in UPSTREAM:
        changes[UPSTREAM[spec["stage"]][1]] = str(out / "trials" / spec["upstream"])
    return to_dict(dataclasses.replace(trial, **changes))


def run_trial(stage: str, resolved: dict, threads: int) -> dict:
    """One trial wherever it runs (a Ray worker or this process): train, export, score every eval set
    with blip2 evaluate's code in this process. Returns its figures, seconds and where it ran."""
    import torch

    from blip2.training.trials import train_trial
    from pipelines.train_eval import evaluate_training_output

    config_cls, task_cls = TASKS[stage]
    config = from_dict(config_cls, resolved)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        task = task_cls(config)

        def on_step(step: int, losses: dict) -> None:
            if step % config.log_every == 0:
                log(f"[{config.name}] step {step}/{config.optim.max_steps} loss {losses['loss']:.3f}")

        model, history = train_trial(task, threads, on_step)
        task.export(model, config.output / MODEL_DIR)
        # what blip2 evaluate and the next stage's task read beside model/: the run's config
        (config.output / "report.json").write_text(json.dumps({"stage": stage, "config": to_dict(config)}) + "\n")
        trained = time.perf_counter()
        benchmarks = evaluate_training_output(config, config.output / MODEL_DIR, str(task.backbones.qformer_tokenizer),
                                              str(task.backbones.vision), num_actors=0)
    finally:
        torch.set_num_threads(previous)
    node = "local"
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    return {"benchmarks": benchmarks, "final_losses": history[-1], "seconds": time.perf_counter() - start,
            "train_seconds": trained - start, "node": node, "pid": os.getpid()}


def _finished(trials_dir: Path, spec: dict, resolved: dict) -> bool:
    path = trials_dir / f"{spec['key']}.json"
    if not path.is_file():
        return False
    return json.loads(path.read_text())["config"] == json.loads(json.dumps(resolved))  # as JSON stores it


def _run_all(specs: dict[str, dict], config: ReproduceConfig, out: Path) -> int:
    """Run the unfinished trials, stage by stage; each result is written the moment it arrives. Returns
    how many ran."""
    trials_dir = out / "trials"
    resolved = {key: resolved_config(spec, out, config.threads_per_trial) for key, spec in specs.items()}
    todo = [spec for spec in specs.values() if not _finished(trials_dir, spec, resolved[spec["key"]])]
    log(f"reproduce: {len(specs)} trials, {len(todo)} to run" + ("" if todo else " (all finished earlier)"))
    if not todo:
        return 0
    ensure_toyworld(ToyWorldJobConfig(out=str(out / "toyworld"), world=config.world))  # once, before any trial
    done = 0
    if config.in_process:
        for spec in sorted(todo, key=lambda s: STAGE_ORDER.index(s["stage"])):
            log(f"reproduce: trial {spec['key']} ({spec['stage']}, seed {spec['seed']}) starts")
            done += 1
            _write(trials_dir, spec, resolved[spec["key"]],
                   run_trial(spec["stage"], resolved[spec["key"]], config.threads_per_trial), done, len(todo))
        return len(todo)
    import ray

    init_ray()  # RAY_ADDRESS (ray job submit) selects a cluster; otherwise a fresh local instance
    remote = ray.remote(num_cpus=config.cpus_per_trial, scheduling_strategy="SPREAD", max_retries=1)(run_trial)  # Ray
    for stage in STAGE_ORDER:  # a stage's trials start once the stage before has finished
        pending = {remote.remote(s["stage"], resolved[s["key"]], config.threads_per_trial): s
                   for s in todo if s["stage"] == stage}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)  # Ray
            spec = pending.pop(ready[0])
            done += 1
            _write(trials_dir, spec, resolved[spec["key"]], ray.get(ready[0]), done, len(todo))
    return len(todo)


def _write(trials_dir: Path, spec: dict, resolved: dict, result: dict, done: int, total: int) -> None:
    record = {"key": spec["key"], "stage": spec["stage"], "seed": spec["seed"], "upstream": spec["upstream"],
              "config": resolved, **result}
    trials_dir.mkdir(parents=True, exist_ok=True)
    path = trials_dir / f"{spec['key']}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.rename(path)  # a trial file is whole or absent
    log(f"reproduce: trial {done}/{total} {spec['key']} (seed {spec['seed']}) done in {result['seconds']:.0f} s "
        f"on {result['node'][:8]}")


def report(config: ReproduceConfig, specs: dict, uses: list[dict], out: Path, command: str, wall: float,
           ran: int) -> dict:
    """``claims.json``: the run, and per claim its arms, every trial's values, the summary and verdict."""
    records = {key: json.loads((out / "trials" / f"{key}.json").read_text()) for key in specs}

    def chain_seconds(key: str) -> float:  # a trial and the trials it started from
        return records[key]["seconds"] + (chain_seconds(specs[key]["upstream"]) if specs[key]["upstream"] else 0.0)

    claims = {}
    for claim_id in config.claims or tuple(CLAIMS):
        claim = CLAIMS[claim_id]
        arms = {arm.name: arm for arm in claim.arms}
        trials = []
        for use in (u for u in uses if u["claim"] == claim_id):
            benchmarks, metric = records[use["key"]]["benchmarks"], claim.metric_of(arms[use["arm"]])
            trials.append({**use, "values": {s: benchmarks[f"{claim.task}/{s}"].get(metric) for s in SPLITS},
                           "seconds": records[use["key"]]["seconds"], "node": records[use["key"]]["node"]})
        keys = {t["key"] for t in trials}
        claims[claim_id] = {"claim": dataclasses.asdict(claim), "runnable": not claim.needs,
                            "summary": summarise(claim, trials, config.min_seeds), "trials": trials,
                            "seconds": sum(chain_seconds(k) for k in keys)}
    return {"command": command, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_seconds": wall, "seeds": list(config.seeds), "min_seeds": config.min_seeds,
            "verdict_rule": VERDICT_RULE, "trials": sorted(specs), "trials_run": ran, "trials_reused": len(specs) - ran,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f} at the end",
            "config": to_dict(config), "claims": claims}


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("blip2 reproduce", __doc__, "reproduce.yaml")
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, claims C2 and C3, small budgets, in this process, only to "
                             "runs/reproduce-quick (CI; verdicts: not enough seeds)")

    def adjust(args, overrides: list[str]) -> list[str]:
        return [*QUICK, *overrides] if args.quick else overrides

    config, _ = parse_config(parser, ReproduceConfig, argv, adjust)
    quiet_progress_bars()
    start = time.perf_counter()
    out = Path(config.out).resolve()  # Ray workers do not run in this directory
    try:
        specs, uses = trial_specs(config)
    except (ConfigError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    ran = _run_all(specs, config, out)
    command = "blip2 reproduce " + " ".join(list(argv) if argv is not None else sys.argv[1:])
    result = report(config, specs, uses, out, command.strip(), time.perf_counter() - start, ran)
    for directory in {out, *([Path(config.claims_dir)] if config.claims_dir else [])}:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "claims.json").write_text(json.dumps(result, indent=2) + "\n")
        (directory / "CLAIMS.md").write_text(render_markdown(result))
    verdicts = ", ".join(f"{c} {e['summary']['verdict'].split(':')[0]}" for c, e in result["claims"].items())
    log(f"reproduce done: {len(specs)} trials ({ran} run) in {result['wall_seconds']:.0f} s; {verdicts}; wrote "
        f"{out}/claims.json, CLAIMS.md" + (f" and {config.claims_dir}/" if config.claims_dir else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

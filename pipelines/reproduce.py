"""``blip2 reproduce``: the papers' claims in miniature, each claim's arms x seeds as parallel Ray trials.

    blip2 reproduce                      # pipelines/configs/reproduce.yaml: every claim, its seeds
    blip2 reproduce --quick              # CI: 2 seeds, claims C2 and C3, small budgets, in this process
    blip2 reproduce seeds=[0,1,2,3,4,5,6,7] claims=[C3,C4]

The claims, their arms (a stage's toy config with overrides) and the verdict rule are in
``blip2/claims.py``. Each trial (a stage trained at one seed) is a Ray task spread over the cluster's
nodes (``in_process=true``: one after the other in this process) that trains in-process
(``blip2/training/trials.py``), exports the model and scores it on the toy world's ``test`` and ``novel``
splits with ``blip2 evaluate``'s code, in the same process (``num_actors=0``). A stage-2 trial starts from
the stage-1 recipe's trial of its seed, an instruction-tuning trial from the stage-2 recipe's. An arm that
trains on ``capfilt:<decoding>`` data (C1, C6) adds a CapFilt trial per seed and decoding: the web split
captioned by the seed's stage-2 recipe trial and filtered by its stage-1 recipe trial, threshold chosen on
``val`` (``captioner`` and ``filter`` below set the rest). An arm with LM-build overrides (C8) adds one
build trial: the shipped set with its LMs pretrained afresh under them (``build_overrides`` sets the
build's budget), which the arm's stage-2 and instruction-tuning trials use. A trial starts once the
trials it needs have finished, lowest seed first. A finished trial is written to
``<out>/trials/<key>.json`` at once and never run again: its key is the stage, the seed and a hash of its
whole training config, the keys of the trials it needs and the sha256 of the backbone files it runs on,
so an interrupted run resumes where it stopped and arms that claims share run once (a trial whose
evaluation sets grew, because a claim was added, runs again). At the end
``claims.json`` and ``CLAIMS.md`` (per claim: each arm's per-seed values, mean, sd and 95% CI on `test`
and `novel`, the paired difference, the verdict, the seconds its trials took; every trial) go to ``out``
and, unless ``claims_dir`` is empty, to ``claims_dir``. A claim whose switch does not exist yet is
reported as not runnable, with what it needs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blip2.capfilt.config import CaptionerConfig, FilterConfig
from blip2.claims import CLAIMS, FACTORS, SPLITS, VERDICT_RULE, render_markdown, summarise, summarise_factor
from blip2.config import ConfigError, apply_overrides, from_dict, load_config, to_dict
from blip2.toyworld.corpus import ToyWorldConfig
from blip2.training.config import EvalSet
from blip2.training.tasks import MODEL_DIR, TASKS
from blip2.training.trials import KEPT_FILE, capfilt_decoding
from pipelines.common import CONFIG_DIR, init_ray, job_parser, log, parse_config, quiet_progress_bars
from pipelines.demo_record import commit
from pipelines.toyworld import ToyWorldJobConfig, ensure_toyworld

STAGE_YAML = {"stage1": "stage1_toy.yaml", "stage2": "stage2_toy.yaml", "instruct": "instruct_toy.yaml"}
CAPFILT, BUILD = "capfilt", "backbones"  # the stages of CapFilt and build trials (blip2/training/trials.py)
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
    claims: tuple[str, ...] = ()  # empty: every claim in blip2.claims.CLAIMS and every factor (FACTORS: F1)
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
    # A CapFilt trial's captioner and filter (the demo's settings); their sources, the filter's threshold
    # (chosen on val), the captioner's seed and decoding are the trial's own.
    captioner: CaptionerConfig = field(default_factory=lambda: CaptionerConfig(num_captions=2, max_new_tokens=16,
                                                                               batch_size=32))
    filter: FilterConfig = field(default_factory=lambda: FilterConfig(batch_size=64))
    build_overrides: tuple[str, ...] = ()  # on top of the shipped set's LM pretraining config, every build trial

    def __post_init__(self) -> None:
        unknown = [c for c in self.claims if c not in CLAIMS and c not in FACTORS]
        if unknown:
            raise ValueError(f"claims must name some of {', '.join([*CLAIMS, *FACTORS])}; unknown: {', '.join(unknown)}")
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


def _key(stage: str, seed: int, hashed) -> str:
    return f"{stage}-seed{seed}-{hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:12]}"


@functools.cache
def backbones_digest(path: str = "") -> str:
    """One sha256 over every file of a backbone set (``""``: the shipped one): part of each trial's key, so
    a finished trial is never reused once the backbones it ran on changed (a rebuilt shipped set)."""
    from blip2.backbones.build import file_digests, find_backbones

    files = file_digests(find_backbones(path or None).root)
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _add_trial(specs: dict, config: ReproduceConfig, stage: str, overrides: Sequence[str], seed: int,
               data: Sequence[str] = (), build: Sequence[str] = ()) -> str:
    """The trial's key, after adding it and every trial it starts from, trains on or runs on to ``specs``."""
    before = UPSTREAM[stage][0] if stage in UPSTREAM else ""
    upstream = _add_trial(specs, config, before, (), seed, build=build if before != "stage1" else ()) if before else ""
    capfilt = {d: _add_capfilt(specs, config, d, seed) for d in map(capfilt_decoding, data) if d}
    backbones = _add_build(specs, config, build) if build else ""
    base = to_dict(_stage_config(config, stage, overrides, seed, upstream))
    extra = {**({"data": list(data), "capfilt": capfilt} if data else {}), **({"backbones": backbones} if build else {})}
    key = _key(stage, seed, {**base, **extra, "backbones_sha256": backbones_digest(base["backbones"])})
    specs.setdefault(key, {"key": key, "stage": stage, "seed": seed, "upstream": upstream, "base": base, "eval": set(),
                           "data": list(data), "capfilt": capfilt, "backbones": backbones,
                           "after": [k for k in (upstream, *capfilt.values(), backbones) if k]})
    return key


def _add_build(specs: dict, config: ReproduceConfig, build: Sequence[str]) -> str:
    """A build trial: the shipped backbone set with its LMs pretrained afresh under ``build`` (on top of the
    shipped set's own LM config and ``build_overrides``). One per distinct build, whatever the seeds."""
    from blip2.backbones.build import find_backbones
    from blip2.backbones.language import LanguagePretrainConfig

    shipped = find_backbones().report()["config"]["language"]
    language = from_dict(LanguagePretrainConfig, apply_overrides(shipped, [*config.build_overrides, *build]))
    key = _key(f"{BUILD}-lm", language.seed, {**to_dict(language), "base_sha256": backbones_digest()})
    specs.setdefault(key, {"key": key, "stage": BUILD, "seed": language.seed, "upstream": "",
                           "base": {"language": to_dict(language)}, "eval": set(), "data": [], "capfilt": {},
                           "backbones": "", "after": []})
    return key


def _add_capfilt(specs: dict, config: ReproduceConfig, decoding: str, seed: int) -> str:
    """A CapFilt trial of the seed's recipes: the stage-2 trial captions, the stage-1 trial filters."""
    captioner_key = _add_trial(specs, config, "stage2", (), seed)
    filter_key = specs[captioner_key]["upstream"]
    base = {"captioner": to_dict(dataclasses.replace(config.captioner, decoding=decoding, source="", seed=seed)),
            "filter": to_dict(dataclasses.replace(config.filter, source="")), "world": to_dict(config.world),
            "seed": seed, "captioner_trial": captioner_key, "filter_trial": filter_key}
    key = _key(f"{CAPFILT}-{decoding}", seed, base)
    specs.setdefault(key, {"key": key, "stage": CAPFILT, "seed": seed, "upstream": captioner_key, "base": base,
                           "eval": set(), "data": [], "capfilt": {}, "backbones": "", "after": [captioner_key, filter_key]})
    return key


def trial_specs(config: ReproduceConfig) -> tuple[dict[str, dict], list[dict]]:
    """Every trial the runnable claims need (prerequisite trials included), by key, and every use of a
    trial by a claim's arm: ``{"claim", "arm", "seed", "key"}``. Arms equal across claims share a key."""
    specs: dict[str, dict] = {}
    uses = []
    for claim_id in _selected(config):
        claim = CLAIMS.get(claim_id) or FACTORS[claim_id]
        if getattr(claim, "needs", ""):
            continue
        limit = min(claim.limit or config.eval_limit, config.eval_limit or claim.limit)
        for index, arm in enumerate(claim.arms):
            # a factor's reference arm runs at the run's seeds, its other arms at the factor's own
            seeds = config.seeds if claim_id in CLAIMS or index == 0 else claim.seeds
            for seed in seeds:
                key = _add_trial(specs, config, arm.stage, arm.overrides, seed, arm.data, arm.build)
                specs[key]["eval"].add((claim.task, limit, claim.prompt))
                uses.append({"claim": claim_id, "arm": arm.name, "seed": seed, "key": key})
    return specs, uses


def _selected(config: ReproduceConfig) -> tuple[str, ...]:
    return config.claims or (*CLAIMS, *FACTORS)


def resolved_config(spec: dict, out: Path, threads: int) -> dict:
    """A trial's whole config: its training config with where it runs and what it is scored on (a
    CapFilt trial: its captioner and filter with their sources, and where it writes)."""
    trials = out / "trials"
    if spec["stage"] == CAPFILT:
        base = spec["base"]
        return {**base, "captioner": {**base["captioner"], "source": str(trials / base["captioner_trial"] / MODEL_DIR)},
                "filter": {**base["filter"], "source": str(trials / base["filter_trial"] / MODEL_DIR)},
                "output": str(trials / spec["key"])}
    if spec["stage"] == BUILD:
        return {**spec["base"], "output": str(trials / spec["key"])}
    config_cls = TASKS[spec["stage"]][0]
    trial = from_dict(config_cls, spec["base"])
    changes = {"name": spec["key"], "storage_path": str(out / "trials"), "toyworld": str(out / "toyworld"),
               "scaling": dataclasses.replace(trial.scaling, torch_threads=threads),
               "eval": tuple(EvalSet(task, split=split, limit=limit, prompt=prompt)
                             for task, limit, prompt in sorted(spec["eval"]) for split in SPLITS)}
    if spec["stage"] in UPSTREAM:
        changes[UPSTREAM[spec["stage"]][1]] = str(out / "trials" / spec["upstream"])
    if spec["backbones"]:  # a build trial's set: its LMs, the shipped image encoder and tokenizers
        changes["backbones"] = str(out / "trials" / spec["backbones"])
    return to_dict(dataclasses.replace(trial, **changes))


def _where() -> str:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    return "local"


def run_trial(stage: str, resolved: dict, threads: int, data: Sequence[str] = (),
              kept: dict[str, str] | None = None) -> dict:
    """One trial wherever it runs (a Ray worker or this process): train on ``data`` (default: the config's
    ``train_split``; ``kept``: the CapFilt trials' kept.json by decoding), export, score every eval set
    with blip2 evaluate's code in this process. Returns its figures, seconds and where it ran."""
    if stage in (CAPFILT, BUILD):
        from blip2.training.trials import build_trial, capfilt_trial

        run = capfilt_trial if stage == CAPFILT else build_trial
        trial_log = lambda line: log(f"[{Path(resolved['output']).name}] {line}")  # noqa: E731
        return {**run(resolved, threads, trial_log), "node": _where(), "pid": os.getpid()}
    from blip2.training.trials import torch_threads, train_trial
    from pipelines.train_eval import evaluate_training_output

    config_cls, task_cls = TASKS[stage]
    config = from_dict(config_cls, resolved)
    with torch_threads(threads):  # training and scoring
        start = time.perf_counter()
        task = task_cls(config)

        def on_step(step: int, losses: dict) -> None:
            if step % config.log_every == 0:
                log(f"[{config.name}] step {step}/{config.optim.max_steps} loss {losses['loss']:.3f}")

        captions = {decoding: json.loads(Path(path).read_text()) for decoding, path in (kept or {}).items()}
        model, history = train_trial(task, threads, on_step, data, captions)
        task.export(model, config.output / MODEL_DIR)
        # what blip2 evaluate and the next stage's task read beside model/: the run's config
        (config.output / "report.json").write_text(json.dumps({"stage": stage, "config": to_dict(config)}) + "\n")
        trained = time.perf_counter()
        benchmarks = evaluate_training_output(config, config.output / MODEL_DIR, str(task.backbones.qformer_tokenizer),
                                              str(task.backbones.vision), num_actors=0)
    return {"benchmarks": benchmarks, "final_losses": history[-1], "seconds": time.perf_counter() - start,
            "train_seconds": trained - start, "node": _where(), "pid": os.getpid()}


def _inputs(spec: dict, out: Path) -> tuple[list[str], dict[str, str]]:
    """A trial's training sources and where its CapFilt trials' kept captions are."""
    return spec["data"], {decoding: str(out / "trials" / key / KEPT_FILE) for decoding, key in spec["capfilt"].items()}


def _levels(specs: dict[str, dict]) -> dict[str, int]:
    """Each trial's depth: 0 for a trial that needs none, else one more than the deepest it needs."""
    depth: dict[str, int] = {}

    def level(key: str) -> int:
        if key not in depth:
            depth[key] = 1 + max((level(k) for k in specs[key]["after"]), default=-1)
        return depth[key]

    return {key: level(key) for key in specs}


def _finished(trials_dir: Path, spec: dict, resolved: dict) -> bool:
    path = trials_dir / f"{spec['key']}.json"
    if not path.is_file():
        return False
    return json.loads(path.read_text())["config"] == json.loads(json.dumps(resolved))  # as JSON stores it


def _run_all(specs: dict[str, dict], config: ReproduceConfig, out: Path,
             progress: Callable[[int], None] = lambda ran: None) -> int:
    """Run the unfinished trials, each once the trials it needs have finished, lowest seed first (a whole
    seed's chain, CapFilt and builds included, finishes early and shows any fault of a later stage); each
    result is written the moment it arrives, then ``progress(trials run so far)`` is called. Returns how
    many ran."""
    trials_dir = out / "trials"
    resolved = {key: resolved_config(spec, out, config.threads_per_trial) for key, spec in specs.items()}
    waiting = {spec["key"]: spec for spec in specs.values() if not _finished(trials_dir, spec, resolved[spec["key"]])}
    total = len(waiting)
    log(f"reproduce: {len(specs)} trials, {total} to run" + ("" if total else " (all finished earlier)"))
    if not total:
        return 0
    ensure_toyworld(ToyWorldJobConfig(out=str(out / "toyworld"), world=config.world))  # once, before any trial
    finished = set(specs) - set(waiting)
    levels = _levels(specs)

    def ready() -> list[dict]:
        return sorted((s for s in waiting.values() if set(s["after"]) <= finished),
                      key=lambda s: (s["seed"], levels[s["key"]], s["key"]))

    def record(spec: dict, result: dict) -> None:
        finished.add(spec["key"])
        _write(trials_dir, spec, resolved[spec["key"]], result, len(finished) - (len(specs) - total), total)
        progress(len(finished) - (len(specs) - total))

    if config.in_process:
        while waiting:
            spec = waiting.pop(ready()[0]["key"])
            log(f"reproduce: trial {spec['key']} ({spec['stage']}, seed {spec['seed']}) starts")
            record(spec, run_trial(spec["stage"], resolved[spec["key"]], config.threads_per_trial, *_inputs(spec, out)))
        return total
    import ray

    init_ray()  # RAY_ADDRESS (ray job submit) selects a cluster; otherwise a fresh local instance
    remote = ray.remote(num_cpus=config.cpus_per_trial, scheduling_strategy="SPREAD", max_retries=1)(run_trial)  # Ray
    # as many in flight as the cluster has room for: the next ones are chosen when a slot frees up
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // config.cpus_per_trial))  # Ray
    pending: dict = {}
    while waiting or pending:
        for spec in ready()[: max(0, slots - len(pending))]:
            del waiting[spec["key"]]
            pending[remote.remote(spec["stage"], resolved[spec["key"]], config.threads_per_trial,
                                  *_inputs(spec, out))] = spec
        done, _ = ray.wait(list(pending), num_returns=1)  # Ray
        spec = pending.pop(done[0])
        record(spec, ray.get(done[0]))  # Ray
    return total


def _write(trials_dir: Path, spec: dict, resolved: dict, result: dict, done: int, total: int) -> None:
    record = {"key": spec["key"], "stage": spec["stage"], "seed": spec["seed"], "upstream": spec["upstream"],
              "after": spec["after"], "data": spec["data"], "config": resolved, "commit": commit(), **result}
    trials_dir.mkdir(parents=True, exist_ok=True)
    path = trials_dir / f"{spec['key']}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.rename(path)  # a trial file is whole or absent
    log(f"reproduce: trial {done}/{total} {spec['key']} (seed {spec['seed']}) done in {result['seconds']:.0f} s "
        f"on {result['node'][:8]}")


INVOCATIONS = "invocations.jsonl"  # in out/: one line per `blip2 reproduce` run over it that had trials to run


class Invocations:
    """``<out>/invocations.jsonl``: every invocation that ran trials over ``out``, this one last, rewritten
    after each of its trials. A resumed run's wall time is the sum of its invocations': one stopped midway
    keeps the time up to its last finished trial (``finished: false``; the trials then in flight rerun)."""

    def __init__(self, out: Path, started: float):
        self.path, self.started = out / INVOCATIONS, started
        earlier = self.path.read_text().splitlines() if self.path.exists() else []
        self.entries = [json.loads(line) for line in earlier if line.strip()]
        self.entries.append({"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
                             "wall_seconds": 0.0, "trials_run": 0, "commit": commit(), "finished": False})

    def update(self, ran: int, finished: bool = False) -> list[dict]:
        self.entries[-1].update(wall_seconds=round(time.time() - self.started, 1), trials_run=ran, finished=finished)
        if ran:  # an invocation that only rewrote the report is not part of the run's time
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".jsonl.partial")
            partial.write_text("".join(json.dumps(entry) + "\n" for entry in self.entries))
            partial.rename(self.path)
            return list(self.entries)
        return self.entries[:-1] or [self.entries[-1]]


def report(config: ReproduceConfig, specs: dict, uses: list[dict], out: Path, command: str, wall: float,
           ran: int, invocations: Sequence[dict] = ()) -> dict:
    """``claims.json``: the run, and per claim its arms, every trial's values, the summary and verdict;
    ``invocations``: every run over ``out`` (this one last), whose wall times sum to the whole run's."""
    records = {key: json.loads((out / "trials" / f"{key}.json").read_text()) for key in specs}

    def chain(key: str) -> set[str]:  # a trial and every trial it started from or trained on
        return {key}.union(*(chain(k) for k in specs[key]["after"]))

    claims, factors = {}, {}
    for claim_id in _selected(config):
        claim = CLAIMS.get(claim_id) or FACTORS[claim_id]
        arms = {arm.name: arm for arm in claim.arms}
        trials = []
        for use in (u for u in uses if u["claim"] == claim_id):
            benchmarks, metric = records[use["key"]]["benchmarks"], arms[use["arm"]].metric or claim.metric
            trials.append({**use, "values": {s: benchmarks[f"{claim.task}/{s}"].get(metric) for s in SPLITS},
                           "seconds": records[use["key"]]["seconds"], "node": records[use["key"]]["node"]})
        keys = set().union(*(chain(t["key"]) for t in trials))
        capfilt = [{"key": k, "seed": specs[k]["seed"], "report": records[k]["capfilt"]}
                   for k in sorted(keys) if specs[k]["stage"] == CAPFILT]
        builds = [{"key": k, "language": specs[k]["base"]["language"], "quality": records[k]["backbones"]}
                  for k in sorted(keys) if specs[k]["stage"] == BUILD]
        if claim_id in FACTORS:
            factors[claim_id] = {"factor": dataclasses.asdict(claim), "summary": summarise_factor(claim, trials),
                                 "trials": trials, "seconds": sum(records[k]["seconds"] for k in keys), "builds": builds}
            continue
        claims[claim_id] = {"claim": dataclasses.asdict(claim), "runnable": not claim.needs,
                            "summary": summarise(claim, trials, config.min_seeds), "trials": trials,
                            "seconds": sum(records[k]["seconds"] for k in keys),
                            **({"capfilt": capfilt} if capfilt else {}), **({"builds": builds} if builds else {})}
    return {"command": command, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
            "trial_commits": sorted({r.get("commit", "unknown") for r in records.values()}),
            "wall_seconds": wall, "invocations": list(invocations),
            "total_wall_seconds": sum(i["wall_seconds"] for i in invocations) if invocations else wall,
            "seeds": list(config.seeds), "min_seeds": config.min_seeds,
            "verdict_rule": VERDICT_RULE, "trials": sorted(specs), "trials_run": ran, "trials_reused": len(specs) - ran,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f} at the end",
            "config": to_dict(config), "claims": claims, "factors": factors}


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("blip2 reproduce", __doc__, "reproduce.yaml")
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, claims C2 and C3, small budgets, in this process, only to "
                             "runs/reproduce-quick (CI; verdicts: not enough seeds)")

    def adjust(args, overrides: list[str]) -> list[str]:
        return [*QUICK, *overrides] if args.quick else overrides

    config, _ = parse_config(parser, ReproduceConfig, argv, adjust)
    quiet_progress_bars()
    start, started = time.perf_counter(), time.time()
    out = Path(config.out).resolve()  # Ray workers do not run in this directory
    try:
        specs, uses = trial_specs(config)
    except (ConfigError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    invocations = Invocations(out, started)
    ran = _run_all(specs, config, out, invocations.update)
    command = "blip2 reproduce " + " ".join(list(argv) if argv is not None else sys.argv[1:])
    result = report(config, specs, uses, out, command.strip(), time.perf_counter() - start, ran,
                    invocations.update(ran, finished=True))
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

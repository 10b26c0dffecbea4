"""``blip2 demo``: the embedded default, end to end on one Ray instance — a noisy web corpus in, a served,
instruction-aware endpoint out.

    blip2 demo [--config pipelines/configs/demo.yaml] [key=value ...]      # or: python -m pipelines.demo

Every step is one of the project's jobs, called as a function on the same Ray instance:

   toyworld             generate the corpus: `web` (35% wrong alt-texts), `clean`, `val`, `test`, `novel`
   audit                Ray Data reads every shard back; each label is checked against its pixels
   backbones            the frozen image encoder and LLMs: the shipped toy set (or a directory, built if missing)
   bootstrap_filter     stage 1 on `clean` (Ray Train): CapFilt's filter
   bootstrap_captioner  stage 2 on `clean` (Ray Train): CapFilt's captioner
   calibrate            the filter's threshold, chosen on `val` right/wrong caption pairs (never on `web`)
   capfilt              CapFilt the `web` split (Ray Data)
   stage1_raw           stage 1 on clean + the raw web split: the comparison (Ray Train)
   stage1               stage 1 on clean + CapFilt's kept web records (Ray Train)
   stage2               stage 2 from `stage1` into the frozen OPT (Ray Train)
   instruct             instruction tuning from `stage2`, the yes/no family held out (Ray Train)
   serve                the instruction-tuned export (+ `stage1` for /v1/match) on Ray Serve, and real
                        HTTP requests about held-out images: caption, question, chat completion, match

Every training step evaluates on the held-out `test` split and exports a transformers checkpoint
(``<out>/train/<step>/model``). At the end: one results table, ``<out>/report.json``,
``<out>/results.png`` and ``<out>/demo_run.json`` (the table with the commit, date, wall time and machine:
``python benchmarks/readme_results.py --demo-run <out>/demo_run.json`` records a full run for the README).
A re-run reuses every step whose output exists for the same config and whose inputs did not change
(``force=true`` redoes everything); a step that was interrupted resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip2.capfilt.config import CapFiltConfig
from blip2.config import apply_overrides, from_dict, load_config, to_dict
from blip2.reporting import plot_workflow
from blip2.toyworld.corpus import SPLITS, ToyWorldConfig
from blip2.toyworld.text import INSTRUCTION_TASKS
from blip2.training.config import InstructConfig, Stage1Config, Stage2Config, TrainConfig
from pipelines.common import CONFIG_DIR, init_ray, job_parser, log, parse_config, serve_environment
from pipelines.demo_record import run_record
from pipelines.demo_requests import ask_endpoint
from pipelines.serve import ServeConfig

MARKER = ".demo_step.json"  # in each step's output directory: its settings, whether it finished, its result


@dataclass(frozen=True)
class DemoConfig:
    """The end-to-end workflow. Each job section is that job's own config; the demo sets every path, the
    world and the backbones in them, so budgets and model choices are what is left to set there."""

    out: str = "runs/demo"
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    backbones: str = ""  # a backbone directory; empty = the set shipped in the package
    ray_address: str = ""  # empty = start a local Ray instance
    num_cpus: int = 0  # logical CPUs of the local instance; 0 = all
    force: bool = False  # redo steps whose output exists
    audit: bool = True
    check_backbones: bool = False  # measure the backbones on held-out data now (else: their build report)
    train_captioner: bool = True  # false: CapFilt uses capfilt.captioner.source as given
    calibrate_on: str = "val"  # "": CapFilt uses capfilt.filter.threshold as given
    compare_raw: bool = True
    bootstrap_filter: Stage1Config = field(default_factory=Stage1Config)
    bootstrap_captioner: Stage2Config = field(default_factory=Stage2Config)
    capfilt: CapFiltConfig = field(default_factory=CapFiltConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    requests: int = 4  # held-out test images sent to the endpoint
    log_level: str = "WARNING"  # of Ray's own loggers (INFO shows every Ray Data execution, Serve access logs, ...)

    def __post_init__(self) -> None:
        if self.calibrate_on and self.calibrate_on not in SPLITS:
            raise ValueError(f"calibrate_on must be one of {SPLITS} or empty, got {self.calibrate_on!r}")
        if self.calibrate_on in ("web", "test"):
            raise ValueError("calibrate_on: choose the threshold on held-out data that is neither filtered nor "
                             "used for the final evaluation (val)")
        if self.requests < 0:
            raise ValueError("requests must be >= 0")


def demo_stage1(overrides: Sequence[str] = ()) -> Stage1Config:
    """The shipped demo's stage-1 recipe (``demo.yaml``'s ``stage1`` section over the defaults) with
    ``overrides`` (keys within the section): what ``benchmarks/stage1_sweep.py`` varies and the fast
    quality tests train."""
    section = to_dict(load_config(DemoConfig, CONFIG_DIR / "demo.yaml").stage1)
    return from_dict(Stage1Config, apply_overrides(section, list(overrides)))


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists), so settings compare across runs."""
    return json.loads(json.dumps(value))


class Workflow:
    """Runs the steps in order, reusing what a previous run finished, and keeps what each step gave."""

    def __init__(self, config: DemoConfig, steps: Sequence[str]) -> None:
        self.config = config
        self.steps = list(steps)
        self.ran: set[str] = set()  # steps that did work this run: the steps that read their output redo theirs
        self.states: dict[str, dict] = {}

    def step(self, name: str, title: str, directory: Path | None, settings: Any, inputs: Sequence[str],
             work: Callable[[], dict]) -> dict:
        """Run ``work`` for step ``name`` unless ``directory`` holds its finished output for these
        ``settings`` and none of the steps it reads (``inputs``) did work this run. Returns its result.
        A step without a directory (a check, not an output) always runs."""
        log(f"[{self.steps.index(name) + 1}/{len(self.steps)}] {name}: {title}")
        if directory is None:
            start = time.perf_counter()
            result = _plain(work())
            self.states[name] = {"seconds": round(time.perf_counter() - start, 1), "reused": False, "result": result}
            return result
        settings = _plain(settings)
        marker = directory / MARKER
        state = json.loads(marker.read_text()) if marker.is_file() else None
        current = state is not None and state["settings"] == settings and not self.config.force \
            and not any(step in self.ran for step in inputs)
        if current and state["done"]:
            log(f"  reusing {directory} (it took {state['seconds']} s; force=true redoes it)")
            self.states[name] = {**state, "reused": True}
            return state["result"]
        if directory.exists() and not current:  # another config's (or stale inputs') output
            shutil.rmtree(directory)
        elif current:
            log(f"  resuming the unfinished run in {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"settings": settings, "done": False}))
        start = time.perf_counter()
        result = _plain(work())
        state = {"settings": settings, "done": True, "seconds": round(time.perf_counter() - start, 1), "result": result}
        marker.write_text(json.dumps(state, indent=2) + "\n")
        self.ran.add(name)
        self.states[name] = {**state, "reused": False}
        return result


def _toy_eval_sets(section: TrainConfig) -> tuple:
    """The evaluation sets of the shipped toy config of ``section``'s stage (a section that names none
    is scored as that config's runs are: on the toy world's test split, in standard formats)."""
    from blip2.config import load_config
    from pipelines.common import CONFIG_DIR
    from pipelines.train import DEFAULT_CONFIGS

    stage = {Stage1Config: "stage1", Stage2Config: "stage2", InstructConfig: "instruct"}[type(section)]
    return load_config(type(section), CONFIG_DIR / DEFAULT_CONFIGS[stage]).eval


def _train(stage: str, config: TrainConfig) -> dict:
    from pipelines import train

    output = train.fit(stage, config)
    report = json.loads((output / "report.json").read_text())
    return {"output": str(output), "model": str(output / "model"), "steps": report["steps"],
            "samples_per_s": report["samples_per_s"], "headline": report["headline"], "eval": report["eval"],
            "goodput": report["time_split"]["goodput"], "time_split": report["time_split"]["seconds"]}


def run(config: DemoConfig) -> dict:
    """Every step, in order, on the Ray instance already running; returns the report."""
    from pipelines import capfilt
    from pipelines.toyworld import ToyWorldJobConfig, audit_corpus, ensure_toyworld

    out = Path(config.out).resolve()
    toyworld, storage = out / "toyworld", out / "train"
    names = ["toyworld", *(["audit"] if config.audit else []), "backbones", "bootstrap_filter",
             *(["bootstrap_captioner"] if config.train_captioner else []), *(["calibrate"] if config.calibrate_on else []),
             "capfilt", *(["stage1_raw"] if config.compare_raw else []), "stage1", "stage2", "instruct",
             *(["serve"] if config.requests else [])]
    flow = Workflow(config, names)

    def job(section: TrainConfig, name: str, **changes: Any) -> TrainConfig:
        return dataclasses.replace(section, name=name, storage_path=str(storage), toyworld=str(toyworld),
                                   world=config.world, backbones=config.backbones,
                                   eval=section.eval or _toy_eval_sets(section), **changes)

    flow.step("toyworld", "generate the corpus", toyworld, to_dict(config.world), [],
              lambda: ensure_toyworld(ToyWorldJobConfig(out=str(toyworld), world=config.world))["counts"])
    results: dict[str, Any] = {}
    if config.audit:
        results["audit"] = flow.step("audit", "read every shard back with Ray Data, check labels against pixels",
                                     out / "audit", {}, ["toyworld"], lambda: audit_corpus(toyworld))
    results["backbones"] = flow.step("backbones", "the frozen image encoder and LLMs (reused, or built if missing)",
                                     None, None, [], lambda: _backbones(config))

    filter_job = job(config.bootstrap_filter, "bootstrap_filter", train_split="clean", train_data=())
    results["bootstrap_filter"] = flow.step("bootstrap_filter", "stage 1 on the clean split (CapFilt's filter)",
                                            filter_job.output, to_dict(filter_job), ["toyworld"],
                                            lambda: _train("stage1", filter_job))
    captioner = config.capfilt.captioner
    if config.train_captioner:
        captioner_job = job(config.bootstrap_captioner, "bootstrap_captioner", train_split="clean", train_data=(),
                            stage1=results["bootstrap_filter"]["output"], llm="opt")
        results["bootstrap_captioner"] = flow.step(
            "bootstrap_captioner", "stage 2 on the clean split (CapFilt's captioner)", captioner_job.output,
            to_dict(captioner_job), ["bootstrap_filter"], lambda: _train("stage2", captioner_job))
        captioner = dataclasses.replace(captioner, source=results["bootstrap_captioner"]["model"])

    scorer = dataclasses.replace(config.capfilt.filter, source=results["bootstrap_filter"]["model"])
    if config.calibrate_on:
        results["calibrate"] = flow.step(
            "calibrate", f"choose the filter threshold on {config.calibrate_on!r} pairs", out / "calibrate",
            {"filter": to_dict(scorer), "split": config.calibrate_on, "world": to_dict(config.world)},
            ["bootstrap_filter"], lambda: _calibrate(scorer, config))
        scorer = dataclasses.replace(scorer, threshold=results["calibrate"]["threshold"])
    capfilt_job = dataclasses.replace(
        config.capfilt, input=dataclasses.replace(config.capfilt.input, format="webdataset",
                                                  path=str(toyworld / "webdataset" / "web")),
        output=str(out / "capfilt"), captioner=captioner, filter=scorer)
    results["capfilt"] = flow.step("capfilt", "caption and filter the web split", out / "capfilt", to_dict(capfilt_job),
                                   ["toyworld", "bootstrap_filter", "bootstrap_captioner", "calibrate"],
                                   lambda: _capfilt_summary(capfilt.run(capfilt_job)))

    clean, web, kept = (str(toyworld / "webdataset" / "clean"), str(toyworld / "webdataset" / "web"),
                        str(out / "capfilt" / "kept"))
    if config.compare_raw:
        raw_job = job(config.stage1, "stage1_raw", train_data=(clean, web))
        results["stage1_raw"] = flow.step("stage1_raw", "stage 1 on clean + the raw web split (the comparison)",
                                          raw_job.output, to_dict(raw_job), ["toyworld"], lambda: _train("stage1", raw_job))
    bootstrapped = (clean, kept)
    stage1_job = job(config.stage1, "stage1", train_data=bootstrapped)
    results["stage1"] = flow.step("stage1", "stage 1 on clean + CapFilt's kept web records", stage1_job.output,
                                  to_dict(stage1_job), ["toyworld", "capfilt"], lambda: _train("stage1", stage1_job))
    stage2_job = job(config.stage2, "stage2", train_data=bootstrapped, stage1=results["stage1"]["output"])
    results["stage2"] = flow.step("stage2", f"stage 2 into the frozen {stage2_job.llm.upper()}", stage2_job.output,
                                  to_dict(stage2_job), ["stage1"], lambda: _train("stage2", stage2_job))
    instruct_job = job(config.instruct, "instruct", train_data=bootstrapped, stage2=results["stage2"]["output"],
                       stage1=results["stage1"]["output"])
    results["instruct"] = flow.step("instruct", "instruction tuning (the instruction enters the Q-Former)",
                                    instruct_job.output, to_dict(instruct_job), ["stage2"],
                                    lambda: _train("instruct", instruct_job))
    if config.requests:
        results["serve"] = flow.step("serve", "the instruction-tuned export on Ray Serve; real requests over HTTP",
                                     None, None, [],
                                     lambda: _serve(config, results["instruct"]["model"], results["stage1"]["model"]))

    seconds = {name: state["seconds"] for name, state in flow.states.items()}
    report = {"results": results, "seconds": seconds, "reused": [n for n, s in flow.states.items() if s["reused"]],
              "config": to_dict(config)}
    (out / "report.json").write_text(json.dumps(_plain(report), indent=2) + "\n")
    _plot(results, seconds, storage, out / "results.png", config.instruct.tasks.held_out())
    return report


def _backbones(config: DemoConfig) -> dict:
    """The backbone set the stages load (the shipped one unless ``backbones`` names a directory; a named
    directory that does not exist yet gets a toy set built there) and its quality on held-out data:
    measured now with ``check_backbones``, else as measured when it was built."""
    from blip2.backbones.build import BackbonesConfig, build_backbones, evaluate_backbones, find_backbones, summary_lines

    if config.backbones and not Path(config.backbones).exists():
        seconds = sum(find_backbones().report()["train_seconds"].values())  # the shipped set's build
        log(f"  building the toy backbones into {config.backbones} (once; the shipped set took {seconds:.0f} s "
            "of training on two cores)")
        build_backbones(BackbonesConfig(), config.backbones, log)
    backbones = find_backbones(config.backbones or None)
    if config.check_backbones:
        quality, measured = evaluate_backbones(backbones, config.world.seed), "now"
    elif backbones.is_complete_toy_set():
        quality, measured = backbones.report()["quality"], "when built"
    else:
        quality, measured = None, "never (not a toy set; check_backbones=true measures it)"
    log(f"  using {backbones.root}; quality on held-out data, measured {measured}:")
    for line in summary_lines(quality) if quality else []:
        log(f"    {line}")
    return {"root": str(backbones.root), "measured": measured, "quality": quality}


def _calibrate(scorer, config: DemoConfig) -> dict:
    from blip2.capfilt.calibrate import calibrate
    from blip2.capfilt.models import CaptionFilter
    from blip2.toyworld.corpus import generate_split

    chosen = calibrate(CaptionFilter(scorer, device="cpu"), generate_split(config.world, config.calibrate_on),
                       seed=config.world.seed)
    log(f"  {scorer.score} threshold {chosen['threshold']:.3f}: flags wrong captions with precision "
        f"{chosen['precision']:.3f}, recall {chosen['recall']:.3f} on {chosen['pairs']} {config.calibrate_on} pairs")
    return chosen


def _capfilt_summary(report: dict) -> dict:
    keys = ("counts", "rates", "kept_captions", "filter_quality", "score", "threshold", "rejected_by_reason",
            "web_caption_issues", "this_run")
    return {k: report[k] for k in keys if k in report}


def _serve(config: DemoConfig, model: str, retrieval: str) -> dict:
    """Deploy, ask, remove: always done afresh (it is the check that the exports serve)."""
    from ray import serve

    from blip2.toyworld.corpus import generate_split
    from pipelines.serve import application, base_url, serve_is_running

    settings = dataclasses.replace(config.serve, model=dataclasses.replace(config.serve.model, source=model,
                                                                           retrieval=retrieval))
    start = time.perf_counter()
    owns_serve = not serve_is_running()  # Serve already up (a cluster's): leave it up afterwards
    logging = {"log_level": config.log_level, "enable_access_log": config.log_level in ("DEBUG", "INFO")}
    serve.start(http_options={"host": settings.http.host, "port": settings.http.port}, logging_config=logging)  # Ray Serve
    serve.run(application(settings), name=settings.http.app_name, route_prefix=settings.http.route_prefix,
              logging_config=logging)
    deployed = time.perf_counter() - start
    log(f"  serving {settings.model.id} at {base_url(settings)} (deployed in {deployed:.1f} s)")
    try:
        records = generate_split(config.world, "test")
        chosen = [records[i * len(records) // config.requests] for i in range(config.requests)]
        answers = ask_endpoint(base_url(settings), settings.model.id, chosen, seed=config.world.seed)
        for exchange in answers["exchanges"]:
            log(f"  {exchange['key']} (truth: {exchange['truth']}): caption {exchange['caption']!r}; "
                f"{exchange['instruction']!r} -> {exchange['answer']!r} (expected {exchange['expected']!r}); "
                f"chat {exchange['chat']!r}; ITM true {exchange['match']['true']['itm_probability']:.2f} "
                f"vs changed {exchange['match']['wrong']['itm_probability']:.2f}")
    finally:
        serve.delete(settings.http.app_name)
        if owns_serve:
            serve.shutdown()
    return {"model": model, "retrieval": retrieval, "deploy_seconds": round(deployed, 1), **answers}


def _plot(results: dict, seconds: dict, storage: Path, out: Path, held_out: tuple[str, ...]) -> None:
    curves = {name: json.loads((storage / name / "history.json").read_text())
              for name in ("bootstrap_filter", "bootstrap_captioner", "stage1_raw", "stage1", "stage2", "instruct")
              if (storage / name / "history.json").is_file()}
    metrics = {"t2i_r1_attribute_itc": "text->image\n(ITC)", "t2i_r1_attribute": "text->image\n(ITM re-rank)",
               "t2i_r1_strict_itc": "text->image, strict\n(ITC)", "i2t_r1_attribute_itc": "image->text\n(ITC)"}
    retrieval = {label: {title: results[name]["eval"][key] for key, title in metrics.items()}
                 for name, label in (("bootstrap_filter", "clean only"), ("stage1_raw", "clean + raw web"),
                                     ("stage1", "clean + CapFilt web")) if name in results}
    accuracy = {task: results["instruct"]["eval"][f"accuracy/{task}"] for task in INSTRUCTION_TASKS
                if f"accuracy/{task}" in results["instruct"]["eval"]}
    plot_workflow(curves, retrieval, accuracy, held_out, seconds, out)


def results_lines(report: dict) -> list[str]:
    """The results table the demo prints (and the README quotes)."""
    r, seconds = report["results"], report["seconds"]
    lines = ["", "== results (held-out test split) " + "=" * 66]
    if "audit" in r:
        a = r["audit"]
        lines.append(f"{'toy world':22s} {a['images']} images; labels confirmed from pixels {a['pixels_match_labels']:.2%}; "
                     f"web alt-texts wrong {1 - a['web_noise'].get('none', 0):.1%}")
    b = r.get("backbones", {})
    if b.get("quality"):
        q = b["quality"]
        lines.append(f"{'frozen backbones':22s} image encoder linear probe {q['vision']['probe']['test']['mean']:.3f} "
                     f"(test); OPT context accuracy {q['opt']['context_accuracy']:.3f}, T5 "
                     f"{q['t5']['context_accuracy']:.3f} (measured {b['measured']})")
    c = r["capfilt"]
    quality = c.get("filter_quality") or {}
    lines.append(f"{'CapFilt (web split)':22s} flags wrong alt-texts with precision {quality.get('precision', float('nan')):.3f}, "
                 f"recall {quality.get('recall', float('nan')):.3f} ({c['score']} >= {c['threshold']:.3f}); kept "
                 f"{c['rates']['kept']:.1%} of {c['counts']['input']} records with {c['kept_captions']['web']} web + "
                 f"{c['kept_captions']['synthetic']} synthetic captions")
    lines.append(f"{'stage 1 t2i R@1':22s} among {r['stage1']['eval']['num_candidates']} images, attribute-level "
                 "(ITC ranking / after ITM re-rank):")
    for name, label in (("bootstrap_filter", "clean only"), ("stage1_raw", "clean + raw web"),
                        ("stage1", "clean + CapFilt web")):
        if name in r:
            e = r[name]["eval"]
            lines.append(f"{'':22s}   {label:20s} {e['t2i_r1_attribute_itc']:.3f} / {e['t2i_r1_attribute']:.3f}   "
                         f"(strict {e['t2i_r1_strict_itc']:.3f}; i2t {e['i2t_r1_attribute_itc']:.3f})")
    e = r["stage2"]["eval"]
    lines.append(f"{'stage 2 captions':22s} attribute accuracy {e['caption_accuracy']:.3f} (all four right), "
                 f"BLEU-4 {e['bleu4']:.3f}, CIDEr-D {e['cider_d']:.2f} on {e['num_images']} images")
    e = r["instruct"]["eval"]
    held_out = from_dict(DemoConfig, report["config"]).instruct.tasks.held_out()
    lines.append(f"{'instruction following':22s} held-in {e['accuracy/held_in']:.3f}; held out "
                 f"({', '.join(held_out)}, zero-shot; chance 0.5) {e['accuracy/held_out']:.3f}")
    if "serve" in r:
        s = r["serve"]
        lines.append(f"{'served (HTTP)':22s} caption right {s['caption_right']}/{s['images']}, answer right "
                     f"{s['answer_right']}/{s['images']}, chat right {s['chat_right']}/{s['images']}, "
                     f"match prefers the true caption {s['match_right']}/{s['images']}; "
                     f"median latency {s['median_latency_ms']:.0f} ms")
    reused = set(report["reused"])
    lines.append(f"{'wall time (s)':22s} " + ", ".join(f"{k} {v:.0f}" + (" (reused)" if k in reused else "")
                                                     for k, v in seconds.items()))
    lines.append(f"{'':22s} total {sum(v for k, v in seconds.items() if k not in reused):.0f} s this run")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    import ray

    start, load_before = time.perf_counter(), os.getloadavg()[0]

    from pipelines.common import quiet_progress_bars

    parser = job_parser("blip2 demo", __doc__, "demo.yaml")
    config, _ = parse_config(parser, DemoConfig, argv)
    quiet_progress_bars()
    for name in ("ray", "ray.data", "ray.train", "ray.serve"):  # the driver's side of Ray's logs
        logging.getLogger(name).setLevel(config.log_level)
    # The dashboard stays on: it serves the State API that Ray Train's controller polls.
    serve_environment()  # Serve's throughput mode for a Ray instance started here (RAY_SERVE_THROUGHPUT_OPTIMIZED=0: off)
    started = init_ray(config.ray_address, config.num_cpus, logging_config=ray.LoggingConfig(log_level=config.log_level))
    try:
        report = run(config)
    finally:
        if started:
            ray.shutdown()
    for line in results_lines(report):
        log(line)
    out = Path(config.out)
    record = run_record(results_lines(report)[2:], report["reused"], time.perf_counter() - start, load_before)
    (out / "demo_run.json").write_text(json.dumps(record, indent=2) + "\n")
    reused = len(report["reused"])
    log(f"demo done: {len(report['seconds'])} steps ({reused} reused) in {record['wall_seconds']} s; report: "
        f"{out / 'report.json'}, plots: {out / 'results.png'} and each job's own (curve.png, scores.png); this run's "
        f"record: {out / 'demo_run.json'}")
    return 0


if __name__ == "__main__":
    # Import under the module's real name so that Ray pickles what it ships by reference (see capfilt.py).
    from pipelines.demo import main as _main

    raise SystemExit(_main())

"""``blip2 train stage1|stage2|instruct``: the three BLIP-2 / InstructBLIP training stages on Ray Train.

    python -m pipelines.train stage1   [--config pipelines/configs/stage1_toy.yaml]   [key=value ...]
    python -m pipelines.train stage2   [--config pipelines/configs/stage2_toy.yaml]   [key=value ...]
    python -m pipelines.train instruct [--config pipelines/configs/instruct_toy.yaml] [key=value ...]

stage1 trains the Q-Former with ITC + ITM + ITG against the frozen image encoder; stage2 starts from a
stage-1 output and trains into a frozen LLM (decoder-only OPT or encoder-decoder T5); instruct starts
from a stage-2 output and tunes on a mixture of instruction tasks (the instruction enters the Q-Former).

Each Ray Train worker loads its own frozen backbones once; DDP wraps only what trains. Input comes from
Ray Data (``get_dataset_shard``): the toy world's WebDataset shards, Parquet, or CapFilt's output
(``train_data=``), validated and decoded once (``pipelines/train_data.py``). A checkpoint (trainable weights, optimiser, scheduler, step, data position) is
reported every ``checkpoint_every`` steps; running the same job again with the same ``name`` and
``storage_path`` resumes from the latest one, and a worker that dies is replaced and training continues
from it (``max_failures``). At the end the driver exports the final checkpoint to ``model/``
(transformers layout: ``Blip2ForImageTextRetrieval``, ``Blip2ForConditionalGeneration`` or
``InstructBlipForConditionalGeneration``), scores it on the evaluation sets the config names (``eval:``;
the toy configs name the toy world's held-out splits in standard formats) with ``blip2 evaluate``'s code,
and writes ``<storage_path>/<name>/``: ``report.json``, ``history.json`` (the loss curve), ``curve.png``
and ``eval/<set>/`` (each set's metrics, predictions and plot).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchTrainer

from blip2.config import ConfigError, from_dict, to_dict
from blip2.models.export import load_trainable
from blip2.reporting import plot_curves
from blip2.datasets.errors import DatasetError
from blip2.training.config import InstructConfig, TrainConfig
from blip2.training.goodput import describe_goodput, time_split
from blip2.training.loop import LoopClock, StepRunner
from blip2.training.mixture import check_source_files
from blip2.training.state import TRAINABLE, TrainingProgress, load_training_state, save_training_state
from blip2.training.tasks import MODEL_DIR, TASKS, TrainingTask
from pipelines.common import init_ray, job_parser, log, parse_config, quiet_progress_bars
from pipelines.instruct_data import evaluate_held_out
from pipelines.train_data import NotEnoughData, describe_input, train_dataset, worker_threads
from pipelines.train_eval import check_eval_sets, evaluate_training_output

HISTORY = "history.json"  # loss curve, kept in every checkpoint so a resumed run continues it
# Ray Train's controller sees that the workers finished at its next poll of the worker group: Ray's 2 s
# default adds about 2 s to every job's end; 0.5 s costs one cheap call per worker per poll. The driver's
# value reaches the controller (Ray passes it on); one set by the user wins.
POLL_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
DEFAULT_CONFIGS = {"stage1": "stage1_toy.yaml", "stage2": "stage2_toy.yaml", "instruct": "instruct_toy.yaml"}


def train_loop(payload: dict) -> None:
    """Runs on every Ray Train worker: ``payload`` is ``{"stage": ..., "config": <config as a dict>}``."""
    config_cls, task_cls = TASKS[payload["stage"]]
    config = from_dict(config_cls, payload["config"])
    quiet_progress_bars()
    torch.set_num_threads(worker_threads(config, config.scaling.cpus_per_worker))
    context = ray.train.get_context()  # Ray
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # Ray
    task: TrainingTask = task_cls(config)
    model = task.prepare(task.build_model(), device, config.scaling.mixed_precision)
    step_module = ray.train.torch.prepare_model(task.step_module(model, rank, world_size, device))  # Ray: DDP
    trainable = task.trainable_module(model)
    runner = StepRunner(step_module, trainable, config, device, task.grad_norm_groups(model), task.before_step)
    optimizer, scheduler = runner.optimizer, runner.scheduler
    progress, history = TrainingProgress(), []
    checkpoint = ray.train.get_checkpoint()  # Ray: resume after a restart or a re-run
    if checkpoint:
        with checkpoint.as_directory() as directory:
            progress = load_training_state(directory, trainable, optimizer, scheduler)
            history = json.loads((Path(directory) / HISTORY).read_text())
        if rank == 0:
            log(f"resuming from step {progress.step} (epoch {progress.epoch}, batch {progress.batch_in_epoch})")

    started_at = progress.step  # kept in the history: shows where each (re)start picked up
    shard = ray.train.get_dataset_shard("train")  # Ray Data
    samples_per_step = config.optim.batch_size * config.optim.grad_accum_steps * world_size
    step_module.train()
    clock = LoopClock()
    start = time.perf_counter()
    while progress.step < config.optim.max_steps:
        batches = iter(shard.iter_batches(batch_size=config.optim.batch_size, batch_format="numpy", drop_last=True,
                                          local_shuffle_buffer_size=config.shuffle_buffer or None,
                                          local_shuffle_seed=(config.seed * 1009 + rank) * 1009 + progress.epoch))
        seen, micro_batches = 0, []
        for index, batch in enumerate(clock.timed("data_wait", batches)):
            seen += 1
            if index < progress.batch_in_epoch:  # the resumed epoch: skip what was already trained on
                continue
            rng = np.random.default_rng([config.seed, rank, progress.epoch, index])  # caption / task draws
            with clock("batch_prep"):  # decoding, tokenising, to the device: on the step's critical path
                inputs = {k: v.to(device) for k, v in task.make_batch(batch, rng).items()}
            with clock("step_compute"):
                totals = runner.micro_step(inputs)
            micro_batches.append(inputs)
            progress.batch_in_epoch = index + 1
            if totals is None:  # accumulating
                continue
            progress.step += 1
            elapsed = time.perf_counter() - start
            history.append({"step": progress.step, "started_at": started_at, "time": round(elapsed, 3), **totals})
            if rank == 0 and (progress.step % config.log_every == 0 or progress.step == 1):
                log(f"[{task.stage}] step {progress.step}/{config.optim.max_steps} "
                    + " ".join(f"{k} {v:.3f}" for k, v in totals.items())
                    + f" lr {runner.learning_rate:.2e} ({elapsed:.0f}s, "
                    + f"{samples_per_step * (progress.step - started_at) / max(elapsed, 1e-9):.0f} samples/s)")
            done = progress.step >= config.optim.max_steps
            if done:
                close = getattr(batches, "close", None)
                if close is not None:  # stop Ray Data's prefetching: the step is then timed alone
                    close()

                def probe() -> dict:  # the loop's time split, and the job's own step timed once it is saved
                    clock.seconds["loop"] = time.perf_counter() - start
                    timing = {**clock.report(), "samples": samples_per_step * (progress.step - started_at)}
                    steps = min(config.goodput_probe_steps, max(1, config.optim.max_steps // 10))
                    if steps == 0:
                        return timing
                    probe_start = time.perf_counter()
                    seconds = runner.time_own_step(micro_batches, steps)
                    return {**timing, "step_samples_per_s": samples_per_step / seconds, "probe_steps": steps,
                            "probe": time.perf_counter() - probe_start}

                _report(rank, trainable, optimizer, scheduler, progress, history, totals, clock=clock, extra=probe)
                return
            if progress.step % config.checkpoint_every == 0:
                with clock("checkpointing"):
                    _report(rank, trainable, optimizer, scheduler, progress, history, totals)
            micro_batches = []
        if seen == 0:  # drop_last and fewer records than a batch: looping on would hang, not train
            raise RuntimeError(f"worker {rank}: epoch {progress.epoch} of the training data gave no full batch "
                               f"of optim.batch_size={config.optim.batch_size} records; add data or lower it")
        progress.epoch += 1
        progress.batch_in_epoch = 0


def _report(rank, model, optimizer, scheduler, progress, history, metrics, clock=None, extra=None) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint, its writing timed by
    ``clock``. ``extra()`` runs on every worker after the checkpoint is written and before it is reported;
    its dict joins the metrics as ``timing/<key>`` (the last report: the loop's time split and the
    goodput probe)."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            with clock("checkpointing") if clock is not None else contextlib.nullcontext():
                save_training_state(directory, model, optimizer, scheduler, progress)
                (Path(directory) / HISTORY).write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        timing = {f"timing/{k}": v for k, v in extra().items()} if extra is not None else {}
        ray.train.report({**metrics, **timing, "step": progress.step}, checkpoint=checkpoint)  # Ray


# ---------------------------------------------------------------------------------------------------
# The job


PATH_FIELDS = ("storage_path", "toyworld", "backbones", "stage1", "stage2", "llm")  # and train_data


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with every path made absolute: Ray Train workers do not run in the driver's directory,
    so a relative path (``stage1=runs/train/stage1-toy``) would name nothing there."""
    changes = {name: str(Path(value).resolve()) for name in PATH_FIELDS
               if (value := getattr(config, name, "")) and not (name == "llm" and value in ("opt", "t5"))}
    changes["train_data"] = tuple(str(Path(path).resolve()) for path in config.train_data)
    changes["eval"] = tuple(dataclasses.replace(s, **{f: str(Path(getattr(s, f)).resolve()) for f in
                                                    ("annotations", "questions", "images") if getattr(s, f)})
                            for s in config.eval)
    if getattr(config, "sources", ()):
        changes["sources"] = tuple(dataclasses.replace(s, **{f: str(Path(getattr(s, f)).resolve()) for f in
                                                             ("annotations", "questions", "images") if getattr(s, f)})
                                   for s in config.sources)
    model = getattr(config, "model", None)
    if model is not None and getattr(model, "bert_path", ""):
        changes["model"] = dataclasses.replace(model, bert_path=str(Path(model.bert_path).resolve()))
    return dataclasses.replace(config, **changes)


def fit(stage: str, config: TrainConfig, task: TrainingTask | None = None, started: float | None = None) -> Path:
    """Train on Ray Train, then evaluate and export on the driver. Returns the output directory.
    ``started``: when the job started (``time.time()``; default now), for the report's time split."""
    clock = {"started": time.time() if started is None else started, "feature_cache": 0.0}
    config = absolute_paths(config)
    check_eval_sets(stage, config)
    task = task or TASKS[stage][1](config)
    data, input_report = train_dataset(config, task, clock)
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    trainer = TorchTrainer(  # Ray Train
        train_loop,
        train_loop_config={"stage": stage, "config": to_dict(config)},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=scaling.placement_strategy),
        run_config=ray.train.RunConfig(name=config.name, storage_path=str(Path(config.storage_path).resolve()),
                                       failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(
                                           num_to_keep=config.checkpoints_to_keep)),
        datasets={"train": data},
    )
    os.environ.setdefault(*POLL_INTERVAL)
    log(f"[{stage}] training {config.name}: {scaling.num_workers} worker(s), {config.optim.max_steps} steps of "
        f"{config.optim.batch_size * config.optim.grad_accum_steps * scaling.num_workers} samples")
    result = trainer.fit()
    clock["fit_returned"] = time.time()
    worker = {k.removeprefix("timing/"): v for k, v in (result.metrics or {}).items() if k.startswith("timing/")}
    return finish(stage, config, result.checkpoint, task, input_report, (clock, worker) if worker else None)


def toy_eval(config: TrainConfig, benchmarks: dict) -> dict:
    """``report.json``'s ``eval``: the metrics of the first evaluation set on a toy split (with its
    ``split``), and those of the same task on the other toy splits under their split's name (stage 1's
    ``novel``), as earlier reports laid them out; the same numbers as in ``benchmarks``."""
    toy_sets = [s for s in config.eval if s.split]
    if not toy_sets:
        return {"split": ""}
    first = toy_sets[0]
    metrics = {"split": first.split, **benchmarks[first.name]}
    metrics.update({s.split: benchmarks[s.name] for s in toy_sets[1:] if s.task == first.task})
    return metrics


def finish(stage: str, config: TrainConfig, checkpoint, task: TrainingTask | None = None,
           input_report: dict | None = None, timing: tuple[dict, dict] | None = None) -> Path:
    """Load the final checkpoint, export it, score the export on the sets ``config.eval`` names (and an
    instruction mixture's held-out sources), write the report and curve. ``input_report`` (from
    :func:`training_data`) is the input's accounting: records kept and skipped. ``timing``: the driver's
    and rank 0's clocks (from :func:`fit`), for the report's time split."""
    export_start = time.perf_counter()
    task = task or TASKS[stage][1](config)
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    model = task.build_model()
    with checkpoint.as_directory() as directory:
        load_trainable(task.trainable_module(model), Path(directory) / TRAINABLE)
        history = json.loads((Path(directory) / HISTORY).read_text())
    model.eval()
    task.export(model, output / MODEL_DIR)
    (output / HISTORY).write_text(json.dumps(history))
    plot_curves(history, list(task.loss_names), output / "curve.png", title=config.name,
                panels=task.curve_panels)
    export_seconds = time.perf_counter() - export_start
    start = time.perf_counter()
    benchmarks = {}
    if config.eval:  # scored on the export by blip2 evaluate's code (loaders, metrics, Ray Data)
        log(f"[{stage}] scoring {', '.join(s.name for s in config.eval)} (blip2 evaluate)")
        benchmarks = evaluate_training_output(config, output / MODEL_DIR, str(task.backbones.qformer_tokenizer),
                                              str(task.backbones.vision))
    eval_seconds = time.perf_counter() - start
    metrics = toy_eval(config, benchmarks)
    this_run = [h for h in history if h["started_at"] == history[-1]["started_at"]]
    steps_timed = this_run[-1]["step"] - this_run[0]["step"]
    seconds = this_run[-1]["time"] - this_run[0]["time"]
    global_batch = config.optim.batch_size * config.optim.grad_accum_steps * config.scaling.num_workers
    report = {
        "stage": stage, "name": config.name, "steps": history[-1]["step"],
        "final_losses": history[-1], "started_at": sorted({h["started_at"] for h in history}),
        "samples_per_s": round(global_batch * steps_timed / seconds, 2) if seconds > 0 else None,
        "headline": task.headline(metrics), "eval": metrics,
        "eval_seconds": round(eval_seconds, 1), "config": to_dict(config),
    }
    if input_report is not None:
        report["input"] = input_report
    if isinstance(config, InstructConfig):  # the mixture's sources: held in (as trained), held out (scored)
        start = time.perf_counter()
        report["sources"] = {"held_in": (input_report or {}).get("mixture", {}),
                             "held_out": evaluate_held_out(config, output / MODEL_DIR)}
        eval_seconds += time.perf_counter() - start
    if config.eval:
        report["benchmarks"] = benchmarks
    if timing is not None:  # where the wall time went, and the loop's samples/s over its own step's
        driver, worker = timing
        report["time_split"] = time_split({**driver, "evaluation": eval_seconds, "export": export_seconds,
                                           "finished": time.time()}, worker)
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"[{stage}] done: {json.dumps(report['headline'])}"
        + (f"; novel: {json.dumps(task.headline(metrics['novel']))}" if "novel" in metrics else "")
        + (f"; input: {describe_input(input_report)}" if input_report is not None else "")
        + (f"; {describe_goodput(report['time_split'])}" if "time_split" in report else "")
        + f"; wrote {output}/: report.json, {HISTORY}, curve.png, {MODEL_DIR}/")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    started = time.time()  # the report's time split counts Ray's start-up as the job's
    argv = list(sys.argv[1:] if argv is None else argv)
    chooser = argparse.ArgumentParser(prog="blip2 train", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    chooser.add_argument("stage", choices=TASKS)
    if not argv or argv[0] in ("-h", "--help"):
        chooser.print_help()
        chooser.exit(0 if argv else 2)
    stage = chooser.parse_args(argv[:1]).stage
    config_cls, task_cls = TASKS[stage]
    parser = job_parser(f"blip2 train {stage}", config_cls.__doc__, DEFAULT_CONFIGS[stage])
    config, _ = parse_config(parser, config_cls, argv[1:])
    quiet_progress_bars()
    try:  # the inputs (the previous stage's output, the data) are checked before Ray starts
        check_eval_sets(stage, config)
        for source in config.train_data:
            if not Path(source).exists():
                raise FileNotFoundError(f"train_data {source} does not exist (WebDataset tars or Parquet: "
                                        f"`blip2 toyworld` or `blip2 capfilt` write them)")
        task = task_cls(config)
        if isinstance(config, InstructConfig):
            check_source_files(config.mixture_sources())  # a missing or malformed file, before Ray starts
        if config.feature_cache and task.stage != "stage1":
            raise ConfigError(f"feature_cache: only stage1 trains from cached image features so far "
                              f"({stage} feeds pixels to transformers' model)")
    except (FileNotFoundError, ConfigError, DatasetError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    init_ray()  # RAY_ADDRESS (ray job submit) selects a cluster; otherwise a fresh local instance
    try:
        fit(stage, config, task, started)
    except NotEnoughData as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``blip2 train stage1``: Q-Former representation learning (ITC + ITM + ITG) on Ray Train.

    python -m pipelines.train stage1 [--config pipelines/configs/stage1_toy.yaml] [key=value ...]

Each worker holds its own frozen image encoder; DDP wraps the training step, whose only trainable
parameters are the Q-Former's. Input comes from Ray Data (``get_dataset_shard``). A checkpoint
(trainable weights, optimiser, scheduler, step, data position) is reported every ``checkpoint_every``
steps; running the same job again with the same ``name`` and ``storage_path`` resumes from the latest
one, and a worker that dies is replaced and training continues from it (``max_failures``). At the end
the driver evaluates the final checkpoint on held-out data and writes ``<storage_path>/<name>/``:
``report.json``, ``curve.png`` and ``model/`` (a ``Blip2ForImageTextRetrieval`` export).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchTrainer
from torch import nn
from transformers import AutoTokenizer

from blip2.backbones.build import find_backbones
from blip2.config import from_dict, to_dict
from blip2.evaluation import evaluate_retrieval
from blip2.models.export import export_stage1, load_trainable
from blip2.models.stage1 import Stage1Objective, Stage1Output, build_stage1_model
from blip2.reporting import plot_curves
from blip2.training.data import stage1_batch
from blip2.training.optim import build_optimizer, build_scheduler
from blip2.training.state import TRAINABLE, TrainingProgress, load_training_state, save_training_state
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from pipelines.common import job_parser, log, parse_config
from pipelines.toyworld import ToyWorldJobConfig, ensure_toyworld

HISTORY = "history.json"  # loss curve, kept in every checkpoint so a resumed run continues it


@dataclass(frozen=True)
class Stage1ModelConfig:
    num_query_tokens: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    image_text_hidden_size: int = 256
    max_text_length: int = 32
    bert_path: str = ""  # initialise the Q-Former from this BERT checkpoint (empty: random)


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_steps: int = 600
    batch_size: int = 64  # per worker
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 2:
            raise ValueError("max_steps must be >= 1 and batch_size >= 2 (ITC needs negatives)")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError("warmup_steps must be in [0, max_steps]")


@dataclass(frozen=True)
class ScalingSettings:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # fractions leave CPUs for Ray Data's read tasks (see ENVIRONMENT.md)


@dataclass(frozen=True)
class Stage1Config:
    name: str = "stage1-toy"
    storage_path: str = "runs/train"
    toyworld: str = "runs/toyworld"  # a toy-world root, written with the defaults below if missing
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    train_split: str = "clean"
    eval_split: str = "test"
    backbones: str = ""  # empty: the toy backbones shipped in the package
    model: Stage1ModelConfig = field(default_factory=Stage1ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    checkpoint_every: int = 100
    max_failures: int = 2
    eval_candidates: int = 100
    log_every: int = 25
    seed: int = 0

    @property
    def output(self) -> Path:
        return Path(self.storage_path) / self.name


class Stage1Step(nn.Module):
    """The training step as a module, so DDP sees one ``forward`` that runs the whole objective."""

    def __init__(self, model: nn.Module, objective: Stage1Objective, generator: torch.Generator) -> None:
        super().__init__()
        self.model, self.objective, self.generator = model, objective, generator  # generator: ITM negatives

    def forward(self, pixel_values, input_ids, attention_mask, ids) -> Stage1Output:
        return self.objective(self.model, pixel_values, input_ids, attention_mask, ids, self.generator)


def _build_model(config: Stage1Config):
    backbones = find_backbones(config.backbones or None)
    m = config.model
    torch.manual_seed(config.seed)  # the same initial weights on every worker
    model = build_stage1_model(backbones.vision, backbones.qformer_tokenizer, m.num_query_tokens,
                               m.image_text_hidden_size, m.hidden_size, m.num_layers, m.num_heads,
                               m.intermediate_size, max_text_length=max(m.max_text_length, 64),
                               bert_path=m.bert_path or None)
    return model, backbones


def train_loop(config_dict: dict) -> None:
    """Runs on every Ray Train worker."""
    config = from_dict(Stage1Config, config_dict)
    context = ray.train.get_context()  # Ray
    rank, world_size = context.get_world_rank(), context.get_world_size()
    model, backbones = _build_model(config)
    tokenizer = AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)
    device = ray.train.torch.get_device()  # Ray
    generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + rank)  # on the sampler's device
    step_module = ray.train.torch.prepare_model(  # Ray: DDP around the step
        Stage1Step(model, Stage1Objective(rank, world_size), generator))
    optimizer = build_optimizer(model, config.optim.learning_rate, config.optim.weight_decay)
    scheduler = build_scheduler(optimizer, config.optim.warmup_steps, config.optim.max_steps)
    progress, history = TrainingProgress(), []
    checkpoint = ray.train.get_checkpoint()  # Ray: resume after a restart or a re-run
    if checkpoint:
        with checkpoint.as_directory() as directory:
            progress = load_training_state(directory, model, optimizer, scheduler)
            history = json.loads((Path(directory) / HISTORY).read_text())
        if rank == 0:
            log(f"resuming from step {progress.step} (epoch {progress.epoch}, batch {progress.batch_in_epoch})")

    started_at = progress.step  # kept in the history: shows where each (re)start picked up
    shard = ray.train.get_dataset_shard("train")  # Ray Data
    step_module.train()
    start = time.perf_counter()
    while progress.step < config.optim.max_steps:
        batches = shard.iter_batches(batch_size=config.optim.batch_size, batch_format="numpy", drop_last=True)
        for index, batch in enumerate(batches):
            if index < progress.batch_in_epoch:  # the resumed epoch: skip what was already trained on
                continue
            inputs = stage1_batch(batch["jpg"], batch["txt"], tokenizer, config.model.max_text_length)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            out = step_module(**inputs)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            progress.step += 1
            progress.batch_in_epoch = index + 1
            losses = {"loss": out.loss.item(), "itc_loss": out.itc_loss.item(), "itm_loss": out.itm_loss.item(),
                      "lm_loss": out.lm_loss.item()}
            history.append({"step": progress.step, "started_at": started_at, **losses})
            if rank == 0 and (progress.step % config.log_every == 0 or progress.step == 1):
                log(f"step {progress.step}/{config.optim.max_steps} " + " ".join(f"{k} {v:.3f}" for k, v in losses.items())
                    + f" lr {scheduler.get_last_lr()[0]:.2e} ({time.perf_counter() - start:.0f}s)")
            done = progress.step >= config.optim.max_steps
            if progress.step % config.checkpoint_every == 0 or done:
                _report(rank, model, optimizer, scheduler, progress, history, losses)
            if done:
                return
        progress.epoch += 1
        progress.batch_in_epoch = 0


def _report(rank, model, optimizer, scheduler, progress, history, metrics) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            save_training_state(directory, model, optimizer, scheduler, progress)
            (Path(directory) / HISTORY).write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({**metrics, "step": progress.step}, checkpoint=checkpoint)  # Ray


def fit(config: Stage1Config) -> Path:
    """Train on Ray Train, then evaluate and export on the driver. Returns the output directory."""
    ensure_toyworld(ToyWorldJobConfig(out=config.toyworld, world=config.world))
    train = ray.data.read_webdataset(str(Path(config.toyworld) / "webdataset" / config.train_split))  # Ray Data
    scaling = config.scaling
    trainer = TorchTrainer(  # Ray Train
        train_loop,
        train_loop_config=to_dict(config),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=config.name, storage_path=str(Path(config.storage_path).resolve()),
                                       failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": train},
    )
    result = trainer.fit()
    return finish(config, result.checkpoint)


def finish(config: Stage1Config, checkpoint) -> Path:
    """Load the final checkpoint, evaluate it on held-out data, write the report, curve and export."""

    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    model, backbones = _build_model(config)
    with checkpoint.as_directory() as directory:
        load_trainable(model, Path(directory) / TRAINABLE)
        history = json.loads((Path(directory) / HISTORY).read_text())
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)
    held_out = generate_split(config.world, config.eval_split)
    metrics = evaluate_retrieval(model, tokenizer, held_out, num_candidates=config.eval_candidates,
                                 max_text_length=config.model.max_text_length)
    export_stage1(model, output / "model")
    plot_curves(history, ["itc_loss", "itm_loss", "lm_loss"], output / "curve.png", title=config.name)
    report = {"stage": "stage1", "steps": history[-1]["step"], "final_losses": history[-1],
              "started_at": sorted({h["started_at"] for h in history}),
              "eval": {"split": config.eval_split, **metrics}, "config": to_dict(config)}
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"stage 1 done: {json.dumps(report['eval'])}")
    log(f"wrote {output / 'report.json'}, {output / 'curve.png'}, {output / 'model'}")
    return output


STAGES = {"stage1": (Stage1Config, "stage1_toy.yaml")}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chooser = argparse.ArgumentParser(prog="blip2 train", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    chooser.add_argument("stage", choices=STAGES)
    if not argv or argv[0] in ("-h", "--help"):
        chooser.print_help()
        chooser.exit(0 if argv else 2)
    stage = chooser.parse_args(argv[:1]).stage
    config_cls, default_yaml = STAGES[stage]
    config, _ = parse_config(job_parser(f"blip2 train {stage}", __doc__, default_yaml), config_cls, argv[1:])
    fit(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

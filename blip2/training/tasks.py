"""What differs between the three training stages, behind one interface the Ray Train loop drives.

A :class:`TrainingTask` builds the model (frozen backbones loaded once, trainable parts initialised the
same on every worker), the *step module* that distributed data parallelism wraps (its ``forward`` runs
the whole objective and returns the losses), turns a batch of records into model inputs and exports the
final model in transformers' layout (scored afterwards by ``blip2 evaluate``'s code). Nothing here knows about
Ray: ``pipelines/train.py`` runs these on Ray Train workers, and a plain loop can run them as well (the
benchmark's single-process baseline does).
"""

from __future__ import annotations

import copy
import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from blip2.backbones.build import ToyBackbones, find_backbones
from blip2.backbones.vision import pixel_values
from blip2.models.export import (
    export_blip2,
    export_instructblip,
    export_stage1,
    import_pretrained,
    import_stage1,
)
from blip2.models.instruct import build_instruct_batch, build_instruct_model
from blip2.models.stage1 import Stage1Objective, build_stage1_model
from blip2.models.stage2 import (
    Blip2Stage2,
    backbone_dtype,
    build_stage2_batch,
    build_stage2_model,
    cast_backbones,
    split_prefix,
)
from blip2.tokenization import IMAGE_TOKEN
from blip2.toyworld.text import instruction_example, parse_attributes
from blip2.toyworld.world import ATTRIBUTES, Attributes
from blip2.training.config import InstructConfig, Stage1Config, Stage2Config, TrainConfig
from blip2.training.data import sample_captions, stage1_text_inputs, stated_attributes, task_mixture
from blip2.training.records import batch_images, caption_choices, json_captions
from blip2.training.mixture import EXAMPLE_JSON
from blip2.training.templates import format_example, load_templates

MODEL_DIR = "model"  # a job's export, inside its output directory


def resolve_model_dir(path: str | Path, what: str) -> Path:
    """A previous job's export: ``path`` itself when it holds a ``config.json``, else ``path/model``."""
    path = Path(path)
    for candidate in (path, path / MODEL_DIR):
        if (candidate / "config.json").is_file():
            return candidate
    command = f"blip2 train {what.replace(' ', '')}"  # "stage 1" -> blip2 train stage1
    raise FileNotFoundError(f"{what}: no model at {path} (expected {path / MODEL_DIR}/config.json); "
                            f"run that job first (`{command}` writes <storage_path>/<name>/model) or point "
                            f"the config at its output directory")


class TrainingTask(ABC):
    """One training stage. ``config`` is its typed job config."""

    stage: str
    loss_names: tuple[str, ...]
    curve_panels: dict[str, tuple[str, ...]] = {}  # curve.png: plots beside the losses (title: history keys)

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.backbones: ToyBackbones = find_backbones(config.backbones or None)

    # -- building -----------------------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """The whole model, frozen parts frozen; trainable parts seeded from ``config.seed``."""

    @abstractmethod
    def step_module(self, model: nn.Module, rank: int, world_size: int, device: torch.device) -> nn.Module:
        """The module DDP wraps: ``forward(**make_batch(...))`` -> ``{"loss": ..., <loss_names>: ...}``."""

    def prepare(self, model: nn.Module, device: torch.device, mixed_precision: bool) -> nn.Module:
        """Move to ``device``; on GPU with ``mixed_precision`` the frozen backbones go to bf16/fp16."""
        model.to(device)
        if mixed_precision and device.type == "cuda":
            cast_backbones(model, backbone_dtype(device))
        return model

    # -- data ---------------------------------------------------------------------------------------
    @functools.cached_property
    def image_size(self) -> int:
        """The frozen image encoder's input size (read once: every batch needs it)."""
        return AutoConfig.from_pretrained(self.backbones.vision).image_size

    @abstractmethod
    def make_batch(self, batch: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Tensor]:
        """Model inputs from one batch of records (numpy columns, as Ray Data's ``iter_batches`` gives)."""

    # -- after training -----------------------------------------------------------------------------
    @abstractmethod
    def export(self, model: nn.Module, out: Path) -> Path:
        """The trained model in transformers' layout, loadable by the next stage, CapFilt and Serve."""

    def headline(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The few numbers a person looks at first, of the metrics of the first evaluation set."""
        return {}

    def grad_norm_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups whose gradient norm each step records (``grad_norm/<name>``)."""
        return {}

    def trainable_module(self, model: nn.Module) -> nn.Module:
        """What the optimiser sees and checkpoints hold (``requires_grad`` parameters only)."""
        return model

    def before_step(self, step: int) -> None:
        """Called before optimiser step ``step`` (0-based) of the module :meth:`step_module` built last:
        where a stage's loss weights follow a schedule."""


# ---------------------------------------------------------------------------------------------------
# Stage 1


class _Stage1Step(nn.Module):
    def __init__(self, model: nn.Module, objective: Stage1Objective, generator: torch.Generator,
                 report_itm_weight: bool = False) -> None:
        super().__init__()
        self.model, self.objective, self.generator = model, objective, generator  # generator: ITM negatives
        self.report_itm_weight = report_itm_weight  # ITM's scheduled factor joins each step's numbers

    def forward(self, input_ids: Tensor, attention_mask: Tensor, ids: Tensor, pixel_values: Tensor | None = None,
                image_embeds: Tensor | None = None, attributes: Tensor | None = None) -> dict[str, Tensor]:
        out = self.objective(self.model, pixel_values, input_ids, attention_mask, ids, self.generator,
                             image_embeds=image_embeds, attributes=attributes)
        weight = {"itm_weight": out.loss.new_tensor(self.objective.itm_weight)} if self.report_itm_weight else {}
        return {"loss": out.loss, "itc_loss": out.itc_loss, "itm_loss": out.itm_loss, "lm_loss": out.lm_loss,
                **weight, **out.diagnostics}


class Stage1Task(TrainingTask):
    stage = "stage1"
    loss_names = ("itc_loss", "itm_loss", "lm_loss")
    curve_panels = {"ITM accuracy on the training batch": ("itm_acc_positive", "itm_acc_hard", "itm_acc_random"),
                    "attributes a sampled ITM negative states differently": ("itm_negative_attributes_differing",),
                    "share of the batch left as ITM negatives": ("itm_negatives_available",),
                    "ITM weight (scheduled)": ("itm_weight",),
                    "gradient norm": ("grad_norm/crossattention", "grad_norm/itm_head")}

    def __init__(self, config: Stage1Config) -> None:
        super().__init__(config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.backbones.qformer_tokenizer)

    def build_model(self) -> nn.Module:
        m = self.config.model
        torch.manual_seed(self.config.seed)  # the same initial weights on every worker
        return build_stage1_model(self.backbones.vision, self.backbones.qformer_tokenizer, m.num_query_tokens,
                                  m.image_text_hidden_size, m.hidden_size, m.num_layers, m.num_heads,
                                  m.intermediate_size, max_text_length=max(m.max_text_length, 64),
                                  bert_path=m.bert_path or None)

    def step_module(self, model, rank, world_size, device):
        generator = torch.Generator(device=device).manual_seed(self.config.seed * 1000 + rank)
        loss = self.config.loss
        max_steps = self.config.optim.max_steps
        objective = Stage1Objective(rank, world_size, itm_weight=loss.itm_weight_at(0, max_steps),
                                    itm_random_negatives=loss.itm_random_negatives_at(0, max_steps),
                                    diagnostics=self.config.itm_diagnostics, itc_weight=loss.itc_weight,
                                    itg_weight=loss.itg_weight)
        self._objective = objective  # before_step sets its ITM weight
        return _Stage1Step(model, objective, generator, report_itm_weight=loss.itm_weight_start is not None)

    def before_step(self, step):
        loss, max_steps = self.config.loss, self.config.optim.max_steps
        self._objective.itm_weight = loss.itm_weight_at(step, max_steps)
        self._objective.itm_random_negatives = loss.itm_random_negatives_at(step, max_steps)
        number = step + 1  # the step about to run; the diagnostics join the steps the job logs
        self._objective.diagnostics = self.config.itm_diagnostics and (
            number == 1 or number % self.config.log_every == 0 or number == max_steps)

    def make_batch(self, batch, rng):
        texts = sample_captions(caption_choices(batch), rng)
        inputs = stage1_text_inputs(texts, self.tokenizer, self.config.model.max_text_length)
        if self.config.itm_diagnostics:
            inputs["attributes"] = stated_attributes(texts)
        if "image_embeds" in batch:  # the frozen-feature cache
            inputs["image_embeds"] = torch.from_numpy(np.stack(list(batch["image_embeds"]))).float()
        else:
            inputs["pixel_values"] = pixel_values(batch_images(batch, self.image_size))
        return inputs

    def grad_norm_groups(self, model):
        return {"crossattention": [p for n, p in model.named_parameters() if ".crossattention." in n],
                "itm_head": list(model.itm_head.parameters())}

    def export(self, model, out):
        return export_stage1(model, out)

    def headline(self, metrics):
        keys = ("t2i_r1_attribute", "t2i_r1_attribute_itc", "t2i_r1_strict", "i2t_r1_attribute",
                "itm_pairwise_random", "itm_pairwise_one_attribute")
        return {k: metrics[k] for k in keys if k in metrics}


# ---------------------------------------------------------------------------------------------------
# Stage 2 and instruction tuning: a frozen LLM behind the Q-Former.


class _LmStep(nn.Module):
    def __init__(self, model: Blip2Stage2) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        loss = self.model(**inputs).lm_loss
        return {"loss": loss, "lm_loss": loss}


class _GenerativeTask(TrainingTask):
    loss_names = ("lm_loss",)

    def step_module(self, model, rank, world_size, device):
        return _LmStep(model)

    def prepare(self, model, device, mixed_precision):
        model = super().prepare(model, device, mixed_precision)
        model.freeze_backbones()
        return model

    def _pixels(self, batch: Mapping[str, Any]) -> Tensor:
        return pixel_values(batch_images(batch, self.image_size))

    @property
    def model_config(self):
        """The built model's config (token layout: query count, image token, decoder-only or not)."""
        if getattr(self, "_model_config", None) is None:
            raise RuntimeError("build_model() first: batches are laid out for the built model")
        return self._model_config

    def _built(self, model: nn.Module) -> Blip2Stage2:
        self._model_config = model.config
        return Blip2Stage2(model)


def _stage1_state_dict(path: str | Path) -> tuple[dict[str, Tensor], Any]:
    stage1 = import_stage1(resolve_model_dir(path, "stage 1"))
    return stage1.state_dict(), stage1.config


class Stage2Task(_GenerativeTask):
    stage = "stage2"

    def __init__(self, config: Stage2Config) -> None:
        super().__init__(config)
        self.stage1_dir = resolve_model_dir(config.stage1, "stage 1")
        self.llm_path = {"opt": self.backbones.opt, "t5": self.backbones.t5}.get(config.llm, Path(config.llm))
        self.tokenizer = AutoTokenizer.from_pretrained(self.llm_path)

    def build_model(self) -> nn.Module:
        state_dict, stage1_config = _stage1_state_dict(self.stage1_dir)
        qformer_config = copy.deepcopy(stage1_config.qformer_config)
        qformer_config.use_qformer_text_input = False  # stage 2 feeds the Q-Former no text
        torch.manual_seed(self.config.seed)
        model = build_stage2_model(self.backbones.vision, self.llm_path, qformer_config,
                                   stage1_config.num_query_tokens, self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                   stage1_state_dict=state_dict if self.config.qformer_from_stage1 else None)
        return self._built(model)

    def make_batch(self, batch, rng):
        captions = sample_captions(caption_choices(batch), rng)
        config = self.config
        if self.model_config.use_decoder_only_language_model:
            prompts, targets = [config.prompt] * len(captions), captions
        else:  # prefix language modelling into the encoder
            prefixes, targets = split_prefix(captions, rng, config.max_prefix_fraction)
            prompts = [" ".join(filter(None, (config.prompt, p))) for p in prefixes]
        return build_stage2_batch(self.tokenizer, self.model_config, self._pixels(batch), targets, prompts,
                                  config.max_text_length, config.max_target_length).model_inputs()

    def export(self, model, out):
        return export_blip2(model, self.tokenizer, self.backbones.vision, out)

    def headline(self, metrics):
        return {k: metrics[k] for k in ("caption_accuracy", "bleu4", "cider_d") if k in metrics}


class InstructTask(_GenerativeTask):
    stage = "instruct"

    def __init__(self, config: InstructConfig) -> None:
        super().__init__(config)
        self.stage2_dir = resolve_model_dir(config.stage2, "stage 2")
        self.qformer_tokenizer = AutoTokenizer.from_pretrained(self.backbones.qformer_tokenizer)
        self.tokenizer = AutoTokenizer.from_pretrained(self.stage2_dir)
        self.mixture = task_mixture(config.tasks.as_dict())  # the toy world's families
        self.templates = load_templates()  # the file sources' task types

    def _stage1_dir(self) -> Path | str:
        if self.config.stage1:
            return self.config.stage1
        report = self.stage2_dir.parent / "report.json"  # the stage-2 job records where it started from
        if report.is_file():
            return json.loads(report.read_text())["config"]["stage1"]
        raise FileNotFoundError(f"set stage1=: {self.stage2_dir} has no stage-2 report naming its stage-1 run")

    def build_model(self) -> nn.Module:
        bundle = import_pretrained(self.stage2_dir)
        state_dict, _ = _stage1_state_dict(self._stage1_dir())
        torch.manual_seed(self.config.seed)
        model = build_instruct_model(bundle.model, self.qformer_tokenizer, state_dict)
        if not self.config.qformer_instruction:  # the ablation: recorded in the config, so the export keeps it
            model.config.qformer_instruction = False
        return self._built(model)

    def draw_tasks(self, captions: Sequence[str], rng: np.random.Generator) -> list[tuple[str, str]]:
        """(instruction, answer) for each caption: a family drawn from the √size mixture, a phrasing drawn
        from its templates. The answer comes from the attributes the caption states (the instruction data
        is built from annotated captions, as InstructBLIP builds it from captioning and VQA datasets);
        a caption that does not state all four can only be asked to be described."""
        tasks, weights = list(self.mixture), np.array(list(self.mixture.values()))
        pairs = []
        for text in captions:
            stated = parse_attributes(text)
            if len(stated) < len(ATTRIBUTES):
                pairs.append((instruction_example("describe", _placeholder, rng).instruction, text))
                continue
            attributes = Attributes(**stated)
            task = tasks[int(rng.choice(len(tasks), p=weights))]
            example = instruction_example(task, attributes, rng)
            pairs.append((example.instruction, text if task == "describe" else example.answer))
        return pairs

    def draw_examples(self, batch: Mapping[str, Any], rng: np.random.Generator) -> list[tuple[str, str]]:
        """(instruction, answer) for each record of a mixture batch: a file source's example through its
        task type's templates (:func:`blip2.training.templates.format_example`), a toy-world record (no
        ``example_json``) through the toy families (:meth:`draw_tasks`)."""
        payloads = batch[EXAMPLE_JSON] if EXAMPLE_JSON in batch else None
        if payloads is None or not any(payloads):  # the toy world alone: as it always trained
            return self.draw_tasks(sample_captions(caption_choices(batch), rng), rng)
        choices = json_captions(batch)
        pairs = []
        for payload, texts in zip(payloads, choices, strict=True):
            if payload:
                pairs.append(format_example(json.loads(payload), rng, self.templates))
            else:
                pairs += self.draw_tasks(sample_captions([texts], rng), rng)
        return pairs

    def make_batch(self, batch, rng):
        pairs = self.draw_examples(batch, rng)
        c = self.config
        return build_instruct_batch(self.tokenizer, self.qformer_tokenizer, self.model_config, self._pixels(batch),
                                    [p[0] for p in pairs], [p[1] for p in pairs], c.max_qformer_length,
                                    c.max_text_length, c.max_target_length).model_inputs()

    def export(self, model, out):
        return export_instructblip(model, self.tokenizer, self.qformer_tokenizer,
                                   AutoImageProcessor.from_pretrained(self.stage2_dir), out)

    def headline(self, metrics):
        keys = ("accuracy/held_in", "accuracy/held_out", "accuracy/all")
        return {k: metrics[k] for k in keys if k in metrics}


_placeholder = Attributes(**{name: values[0] for name, values in ATTRIBUTES.items()})  # describe phrasings ignore attributes

TASKS: dict[str, tuple[type[TrainConfig], type[TrainingTask]]] = {
    "stage1": (Stage1Config, Stage1Task),
    "stage2": (Stage2Config, Stage2Task),
    "instruct": (InstructConfig, InstructTask),
}

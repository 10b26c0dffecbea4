"""The typed configs of the three training jobs (``blip2 train stage1|stage2|instruct``).

Every job shares :class:`TrainConfig` (where the data and the run live, the optimiser, how many workers,
checkpointing) and adds its own model section. Defaults are the toy world's; ``pipelines/configs/`` holds
the YAML files for the toy presets and for the published-size presets on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from blip2.datasets.task_kinds import TASK_KINDS
from blip2.models.generation_params import GenerationParams
from blip2.toyworld.corpus import ToyWorldConfig
from blip2.toyworld.standard import HELD_OUT_SPLITS
from blip2.toyworld.text import HELD_OUT_TASKS, INSTRUCTION_TASKS


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (betas 0.9/0.98, decay on matrices only), per-step linear warmup then cosine decay."""

    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_steps: int = 600  # optimiser steps
    batch_size: int = 64  # per worker and micro-batch; global batch = batch_size * workers * grad_accum_steps
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 2:
            raise ValueError("max_steps must be >= 1 and batch_size >= 2 (ITC needs negatives)")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError("warmup_steps must be in [0, max_steps]")
        if self.grad_accum_steps < 1 or self.grad_clip < 0:
            raise ValueError("grad_accum_steps must be >= 1 and grad_clip >= 0")


@dataclass(frozen=True)
class ScalingSettings:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # fractions leave CPUs for Ray Data's read tasks (docs/ray-and-transformers-traps.md)
    gpus_per_worker: float = 1.0  # with use_gpu
    torch_threads: int = 0  # intra-op threads per worker; 0: as many as the worker's CPUs (at least 1)
    mixed_precision: bool = True  # bf16 autocast and half-precision backbones on GPU; always fp32 on CPU
    placement_strategy: str = "PACK"  # "SPREAD": one worker per node where possible

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0 or self.torch_threads < 0:
            raise ValueError("num_workers must be >= 1, cpus_per_worker > 0 and torch_threads >= 0")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")


@dataclass(frozen=True)
class EvalSet:
    """A standard evaluation set the trained model is scored on after training, through the same
    loaders and metrics as ``blip2 evaluate`` (``blip2/datasets/tasks.py`` lists the tasks and files).

    Either ``split`` (``val`` / ``test`` / ``novel``: the job's toy world's copy of that split in the
    task's standard format, written with the toy world if missing; the toy-only metrics come beside the
    standard ones) or the set's own files. Retrieval re-ranks with the stage-1 config's ``rerank_k`` and
    ``rerank_itc_scale``; questions on a toy split are split into held-in and held-out families by the
    instruction config's ``tasks``.
    """

    task: str  # coco_retrieval, coco_captions, nocaps, vqav2, okvqa, gqa
    split: str = ""  # a toy-world split; empty: the files below
    annotations: str = ""
    questions: str = ""
    images: str = ""
    prompt: str = ""  # captioning: text before the caption; questions: a template with {}
    generation: GenerationParams = field(default_factory=GenerationParams)
    limit: int = 0  # the first N images / questions (0: all)

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"eval set {self.task}: limit must be >= 0, got {self.limit}")
        if self.task not in TASK_KINDS:
            raise ValueError(f"eval task must be one of {', '.join(TASK_KINDS)}, got {self.task!r}")
        if self.split and self.split not in HELD_OUT_SPLITS:
            raise ValueError(f"eval split must be one of {HELD_OUT_SPLITS}, got {self.split!r}")
        if not self.split and not self.images:
            raise ValueError(f"eval set {self.task}: give split (a toy-world split) or the set's files (images=...)")

    @property
    def name(self) -> str:
        """The set's key in ``report.json``'s ``benchmarks``: ``<task>`` or ``<task>/<toy split>``."""
        return f"{self.task}/{self.split}" if self.split else self.task


@dataclass(frozen=True)
class TrainConfig:
    """What every training job shares.

    The training data is ``train_data`` when set: one or more sources, each a directory (or one file)
    of WebDataset ``.tar`` shards in img2dataset's layout, Parquet shards with ``image`` bytes and
    ``text``, or CapFilt's ``kept`` Parquet output (``captions`` lists; one kept caption is sampled per
    record per step); several sources train as one shuffled mix (e.g. a clean set plus CapFilt's output
    of a web crawl). Else it is the toy world's ``train_split`` under ``toyworld`` (written with
    ``world`` if missing). After training the export is scored on the sets ``eval`` names (``EvalSet``:
    a toy world's held-out split in a standard format, or a standard set's files), each by
    ``blip2 evaluate``'s code into ``report.json``'s ``benchmarks``; none named, none scored. The toy
    world is made only when the training data or an evaluation set is one of its splits.
    """

    name: str = "train"
    storage_path: str = "runs/train"
    toyworld: str = "runs/toyworld"
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    train_split: str = "clean"
    train_data: tuple[str, ...] = ()  # one path (`train_data=DIR`) or a list (`train_data=[DIR1,DIR2]`)
    eval: tuple[EvalSet, ...] = ()  # sets scored after training, e.g. [{task: vqav2, split: test, limit: 600}]
    # where the `eval` sets are scored: N > 0, a Ray Data pool of up to N actors; 0, in the driver's own process;
    # empty (the default): one actor per training worker, each on a GPU, when training on GPUs, else 0 — on CPU a
    # fresh actor that imports torch and loads the model costs more than scoring a small set (a toy retrieval
    # set of 100 images: ~33 s through the pool's three passes, ~8 s in the driver, on two cores)
    eval_num_actors: int | None = None
    backbones: str = ""  # empty: the toy backbones shipped in the package
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    feature_cache: bool = False  # precompute the frozen image encoder's outputs once (Ray Data) and train on them
    shuffle_buffer: int = 1000  # records each worker shuffles locally every epoch (with block order randomised); 0: off
    # hold the prepared training records (decoded images or cached features) in Ray's object store after one
    # pass, so that later epochs neither re-read nor re-decode them (it spills to disk when larger than the store)
    materialize_data: bool = True
    checkpoint_every: int = 100
    checkpoints_to_keep: int = 2
    max_failures: int = 2
    log_every: int = 25
    seed: int = 0
    # after the last checkpoint is saved, time this many more steps of the job's own step on its last batch
    # (at most a tenth of max_steps, at least 1): report.json's goodput is the job's samples/s over it
    goodput_probe_steps: int = 10

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")
        if self.goodput_probe_steps < 0:
            raise ValueError("goodput_probe_steps must be >= 0")
        if self.shuffle_buffer < 0:
            raise ValueError("shuffle_buffer must be >= 0")
        if self.eval_num_actors is not None and self.eval_num_actors < 0:
            raise ValueError(f"eval_num_actors must be >= 0 (0: in the driver) or empty, got {self.eval_num_actors}")

    @property
    def output(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def eval_actors(self) -> int:
        """The evaluation's actor pool size (``eval_num_actors`` resolved; 0: in the driver)."""
        if self.eval_num_actors is not None:
            return self.eval_num_actors
        return self.scaling.num_workers if self.scaling.use_gpu else 0


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
class Stage1LossConfig:
    """How stage 1 weighs and feeds its objectives (BLIP-2's recipe is ``itm_weight=1``,
    ``itm_random_negatives=0``, no ITM schedule).

    ITM's factor may follow a schedule over training (:meth:`itm_weight_at`): ``itm_weight_start`` for the
    first ``itm_weight_hold`` share of the steps, then linear to ``itm_weight`` over the next
    ``itm_weight_ramp`` share, then ``itm_weight``. Shares of ``optim.max_steps``, so a shorter run keeps the
    shape of the schedule.

    The negatives' hardness may follow a schedule too (:meth:`itm_random_negatives_at`): with
    ``itm_random_negatives_end`` set, the share of random negatives goes linearly from
    ``itm_random_negatives`` at the first step to ``itm_random_negatives_end`` at the
    ``itm_random_negatives_ramp`` share of the steps, then stays there (easy negatives first, BLIP's
    ITC-hard ones once ITC's features have formed)."""

    itm_weight: float = 1.0  # ITM's factor in the summed loss (after the schedule, if any)
    itm_random_negatives: float = 0.0  # share of ITM negatives drawn uniformly rather than by ITC hardness
    itm_weight_start: float | None = None  # ITM's factor at the start; None: itm_weight throughout
    itm_weight_hold: float = 0.0  # share of max_steps at itm_weight_start
    itm_weight_ramp: float = 0.0  # share of max_steps to go linearly from itm_weight_start to itm_weight
    itm_random_negatives_end: float | None = None  # random share at the ramp's end; None: itm_random_negatives throughout
    itm_random_negatives_ramp: float = 1.0  # share of max_steps over which the random share reaches its end
    # ITC's and ITG's factors in itc_weight * ITC + itm_weight * ITM + itg_weight * ITG; 0 ablates one
    # (BLIP-2's ITG ablation: itg_weight=0). The loss is still computed and logged.
    itc_weight: float = 1.0
    itg_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.itm_weight < 0 or not 0 <= self.itm_random_negatives <= 1:
            raise ValueError("itm_weight must be >= 0 and itm_random_negatives in [0, 1]")
        if self.itc_weight < 0 or self.itg_weight < 0:
            raise ValueError("itc_weight and itg_weight must be >= 0")
        if self.itm_weight_start is not None and self.itm_weight_start < 0:
            raise ValueError("itm_weight_start must be >= 0 (or null: no schedule)")
        if self.itm_weight_hold < 0 or self.itm_weight_ramp < 0 or self.itm_weight_hold + self.itm_weight_ramp > 1:
            raise ValueError("itm_weight_hold and itm_weight_ramp must be >= 0 and sum to at most 1")
        if self.itm_random_negatives_end is not None and not 0 <= self.itm_random_negatives_end <= 1:
            raise ValueError("itm_random_negatives_end must be in [0, 1] (or null: no schedule)")
        if not 0 < self.itm_random_negatives_ramp <= 1:
            raise ValueError("itm_random_negatives_ramp must be in (0, 1]")

    def itm_weight_at(self, step: int, max_steps: int) -> float:
        """ITM's factor for optimiser step ``step`` (0-based) of ``max_steps``."""
        if self.itm_weight_start is None:
            return self.itm_weight
        done = step / max_steps
        if done < self.itm_weight_hold:
            return self.itm_weight_start
        if done >= self.itm_weight_hold + self.itm_weight_ramp:
            return self.itm_weight
        share = (done - self.itm_weight_hold) / self.itm_weight_ramp
        return self.itm_weight_start + share * (self.itm_weight - self.itm_weight_start)

    def itm_random_negatives_at(self, step: int, max_steps: int) -> float:
        """The share of ITM negatives drawn at random (not by ITC hardness) at optimiser step ``step``."""
        if self.itm_random_negatives_end is None:
            return self.itm_random_negatives
        share = min(1.0, step / (max_steps * self.itm_random_negatives_ramp))
        return self.itm_random_negatives + share * (self.itm_random_negatives_end - self.itm_random_negatives)


@dataclass(frozen=True)
class Stage1Config(TrainConfig):
    """Stage 1: Q-Former representation learning with ITC + ITM + ITG against a frozen image encoder."""

    name: str = "stage1-toy"
    model: Stage1ModelConfig = field(default_factory=Stage1ModelConfig)
    loss: Stage1LossConfig = field(default_factory=Stage1LossConfig)
    rerank_k: int = 16  # retrieval evaluation: ITM re-ranks ITC's top k (blip2 evaluate reads it from report.json)
    rerank_itc_scale: float = 1.0  # re-rank score = ITM logit + this * ITC cosine similarity (BLIP-2: 1)
    itm_eval_images: int = 200  # toy retrieval sets: images whose right / one-attribute-wrong / random pairs ITM scores
    # ITM accuracies and negative hardness, in the history and curve, on the steps the job logs (the first,
    # every log_every-th, the last): an extra no-gradient ITM pass costs about 4% of a step where it runs
    itm_diagnostics: bool = True


@dataclass(frozen=True)
class Stage2Config(TrainConfig):
    """Stage 2: generative learning from a stage-1 checkpoint into a frozen LLM (decoder-only or
    encoder-decoder). Captions are the targets; encoder-decoder LLMs get the paper's prefix LM (a random
    prefix of the caption joins the queries in the encoder)."""

    name: str = "stage2-toy-opt"
    stage1: str = "runs/train/stage1-toy"  # a stage-1 job's output directory (its model/), or a model/ itself
    # false: the Q-Former (same shape as stage 1's) starts freshly initialised instead of from stage 1's
    # weights: BLIP-2's Fig. 5 ablation, "without representation learning"
    qformer_from_stage1: bool = True
    llm: str = "opt"  # "opt" / "t5" (the toy backbones) or a transformers LLM directory
    prompt: str = ""  # fed before every caption (e.g. "a photo of"), not trained on
    max_prefix_fraction: float = 0.5  # encoder-decoder prefix LM: at most this share of words go to the encoder
    max_text_length: int = 32
    max_target_length: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.max_prefix_fraction < 1:
            raise ValueError("max_prefix_fraction must be in [0, 1)")


def _default_size(task: str, size: int) -> int:
    """A family's default size: 0 for the families the toy world holds out (``HELD_OUT_TASKS``, their one
    definition), else ``size``."""
    return 0 if task in HELD_OUT_TASKS else size


@dataclass(frozen=True)
class TaskSizes:
    """How many training examples each instruction family has: families are sampled in proportion to the
    square root of their size (InstructBLIP's mixture). A family of size 0 is never trained on: it is
    held out and evaluated zero-shot (:meth:`held_out`)."""

    colour: int = _default_size("colour", 1000)
    shape: int = _default_size("shape", 1000)
    size: int = _default_size("size", 500)
    position: int = _default_size("position", 500)
    describe: int = _default_size("describe", 4000)
    verify: int = _default_size("verify", 4000)  # single-attribute yes/no: the held-in cousin of existence
    existence: int = _default_size("existence", 4000)  # held out by default: evaluated zero-shot

    def __post_init__(self) -> None:
        if any(v < 0 for v in self.as_dict().values()) or not any(self.as_dict().values()):
            raise ValueError("task sizes must be >= 0 and not all 0")

    def as_dict(self) -> dict[str, int]:
        return {task: getattr(self, task) for task in INSTRUCTION_TASKS}

    def held_out(self) -> tuple[str, ...]:
        """The families this run never trains on (size 0), in ``INSTRUCTION_TASKS`` order."""
        return tuple(task for task, size in self.as_dict().items() if size == 0)


# Each source format, the task types its examples can be, the first being the default.
SOURCE_FORMATS: dict[str, tuple[str, ...]] = {
    "coco_captions": ("captioning",), "karpathy": ("captioning",), "nocaps": ("captioning",),
    "vqav2": ("vqa",), "okvqa": ("vqa",), "gqa": ("vqa",), "aokvqa": ("multiple_choice", "vqa"),
    "llava": ("conversation",), "toyworld": ("toy",),
}
# The evaluation task (blip2 evaluate's) that scores a held-out source of each format zero-shot.
HELD_OUT_TASKS_BY_FORMAT: dict[str, str] = {"coco_captions": "coco_captions", "karpathy": "coco_captions",
                                            "nocaps": "nocaps", "vqav2": "vqav2", "okvqa": "okvqa", "gqa": "gqa"}


@dataclass(frozen=True)
class InstructionSource:
    """One dataset of the instruction-tuning mixture, in its published format (``blip2/training/mixture.py``).

    ``format``: ``coco_captions`` (COCO captions JSON), ``karpathy`` (LAVIS's Karpathy JSON), ``nocaps``,
    ``vqav2`` / ``okvqa`` (questions + annotations JSON), ``gqa`` (balanced questions JSON), ``aokvqa``,
    ``llava`` (LLaVA-Instruct conversations), or ``toyworld``: the job's toy world split (``train_split``)
    or ``train_data`` records, whose instruction families (``tasks``) are its templates. A held-in source
    is sampled with probability proportional to ``weight`` if set, else to the square root of its size
    (``size`` if set, else its number of examples). A held-out source is never trained on: it is
    evaluated zero-shot after training with its format's metric.
    """

    name: str
    format: str
    task: str = ""  # captioning, vqa, multiple_choice, conversation; empty: the format's default
    annotations: str = ""  # captions / annotations / A-OKVQA / LLaVA JSON
    questions: str = ""  # VQA or GQA questions JSON
    images: str = ""  # the image directory the files name their images relative to
    held_out: bool = False
    size: int = 0  # what the mixture weighs the source by; 0: its number of examples
    weight: float = 0.0  # > 0: its sampling weight instead of sqrt(size)
    limit: int = 0  # held out: score the first N images / questions only (0: all)
    generation: GenerationParams = field(default_factory=GenerationParams)  # held out: how answers are decoded

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"source {self.name!r}: format must be one of {', '.join(SOURCE_FORMATS)}, got {self.format!r}")
        if self.task and self.task not in SOURCE_FORMATS[self.format]:
            raise ValueError(f"source {self.name!r}: a {self.format} source can be {' or '.join(SOURCE_FORMATS[self.format])}"
                             f", not {self.task!r}")
        if self.size < 0 or self.weight < 0 or self.limit < 0:
            raise ValueError(f"source {self.name!r}: size, weight and limit must be >= 0")
        if self.format != "toyworld" and not self.images:
            raise ValueError(f"source {self.name!r}: set images= to the directory holding its images")
        if self.held_out and self.format not in HELD_OUT_TASKS_BY_FORMAT:
            raise ValueError(f"source {self.name!r}: a held-out source is scored zero-shot by blip2 evaluate, which has "
                             f"no {self.format} task (held-out formats: {', '.join(HELD_OUT_TASKS_BY_FORMAT)}); "
                             f"hold it in, or hold out a toy family with tasks.<family>=0")

    @property
    def task_type(self) -> str:
        return self.task or SOURCE_FORMATS[self.format][0]

    def files(self) -> tuple[str, ...]:
        return tuple(str(Path(f).resolve()) for f in (self.annotations, self.questions) if f)


TOY_SOURCE = InstructionSource(name="toyworld", format="toyworld")


def check_sources(sources: tuple[InstructionSource, ...], toy_eval_sets: tuple[str, ...] = ()) -> None:
    """Start-up checks of a mixture: names unique, one toy world at most, something held in, and no
    held-out file trained on (a held-out set must stay unseen, as InstructBLIP holds out whole datasets)."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"sources: names must be distinct, got {names}")
    if sum(s.format == "toyworld" for s in sources) > 1:
        raise ValueError("sources: one toyworld source at most (its families are weighed by tasks.*)")
    if not any(not s.held_out for s in sources):
        raise ValueError("sources: every source is held out; nothing would be trained on")
    trained = {f: s.name for s in sources if not s.held_out for f in s.files()}
    for source in (s for s in sources if s.held_out):
        for file in source.files():
            if file in trained:
                raise ValueError(f"source {source.name!r} is held out, but its file {file} is also trained on by "
                                 f"source {trained[file]!r}: a held-out set must never be trained on")
    if toy_eval_sets and not any(s.format == "toyworld" and not s.held_out for s in sources):
        raise ValueError(f"eval sets {', '.join(toy_eval_sets)} score the toy world's instruction families, but no "
                         f"toyworld source is trained on: name other sets under eval (the held-out sources are "
                         f"scored anyway)")


@dataclass(frozen=True)
class InstructConfig(TrainConfig):
    """Instruction tuning (InstructBLIP) from a stage-2 checkpoint: the instruction enters the Q-Former
    (whose text weights come from stage 1) and the LLM. It tunes on a mixture of ``sources`` (default:
    the toy world alone) and scores the held-out ones zero-shot."""

    name: str = "instruct-toy-opt"
    stage2: str = "runs/train/stage2-toy-opt"  # a stage-2 job's output directory (its model/), or a model/ itself
    stage1: str = ""  # the stage-1 output for the Q-Former's text weights; empty: the one stage 2 started from
    tasks: TaskSizes = field(default_factory=TaskSizes)
    max_qformer_length: int = 32
    max_text_length: int = 32
    max_target_length: int = 32
    # false: the Q-Former is given no instruction (an empty one), in training and in the export's use: the
    # instruction-unaware ablation of InstructBLIP's Table 3; the instruction still reaches the LLM
    qformer_instruction: bool = True
    sources: tuple[InstructionSource, ...] = ()  # the mixture; empty: the toy world alone (TOY_SOURCE)
    mixture_epoch: int = 0  # examples per pass over the mixture; 0: see blip2.training.mixture.epoch_counts

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixture_epoch < 0:
            raise ValueError("mixture_epoch must be >= 0")
        check_sources(self.mixture_sources(), tuple(s.name for s in self.eval if s.split))

    def mixture_sources(self) -> tuple[InstructionSource, ...]:
        return self.sources or (TOY_SOURCE,)

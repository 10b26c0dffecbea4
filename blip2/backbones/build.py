"""Build, evaluate and locate the toy world's frozen backbones.

A backbone directory holds what a hub checkpoint would, written with ``save_pretrained``:

    vision/              Blip2VisionModel + BlipImageProcessor config
    opt/                 OPTForCausalLM + the LM tokenizer
    t5/                  T5ForConditionalGeneration + the LM tokenizer
    qformer_tokenizer/   WordPiece tokenizer of the Q-Former's text side (with [DEC])
    report.json          the build config, every quality number and the build's provenance
                         (seeds, library versions, sha256 of every other file)

Everything downstream loads them with ``from_pretrained(path)``: exactly the code path of a real
checkpoint. A built set ships inside the package (``blip2/assets/toy_backbones``) so that the demo and
the tests need not rebuild it; ``build_backbones`` reproduces it from the seed: the tokenizers byte for
byte anywhere; the weights from the config's seeds with torch in deterministic mode, so byte for byte on
the same kind of machine (float reductions may round differently on other CPUs or thread counts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Blip2VisionModel,
    BlipImageProcessorPil,
)

from blip2.backbones.language import (
    LanguagePretrainConfig,
    evaluate_language_model,
    pretrain_causal_lm,
    pretrain_seq2seq_lm,
)
from blip2.backbones.vision import (
    IMAGE_MEAN,
    IMAGE_STD,
    VisionPretrainConfig,
    attribute_labels,
    linear_probe,
    pretrain_vision,
    sample_images,
)
from blip2.tokenization import build_lm_tokenizer, build_qformer_tokenizer
from blip2.toyworld.corpus import ToyWorldConfig, generate_split, split_attributes
from blip2.toyworld.text import vocabulary_text
from blip2.toyworld.world import ATTRIBUTES, all_attributes, decode_image

PACKAGED_BACKBONES = Path(__file__).resolve().parent.parent / "assets" / "toy_backbones"
PARTS = ("vision", "opt", "t5", "qformer_tokenizer")
LM_HEADLINE = ("perplexity", "context_accuracy", "answer_accuracy")  # the per-task accuracies are in the report


@dataclass(frozen=True)
class BackbonesConfig:
    """What ``blip2 backbones`` builds. Each part carries its own seed."""

    vision: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    language: LanguagePretrainConfig = field(default_factory=LanguagePretrainConfig)
    # The probe is scored on the `test` (and `novel`) split of the toy world with this seed.
    eval_toyworld_seed: int = 0
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass(frozen=True)
class ToyBackbones:
    """Paths of a built backbone set; each is a ``from_pretrained`` directory."""

    root: Path

    def is_complete_toy_set(self) -> bool:
        """Every part a built toy set has, its report included."""
        return all((self.root / p).exists() for p in (*PARTS, "report.json"))

    @property
    def vision(self) -> Path:
        return self.root / "vision"

    @property
    def opt(self) -> Path:
        return self.root / "opt"

    @property
    def t5(self) -> Path:
        return self.root / "t5"

    @property
    def qformer_tokenizer(self) -> Path:
        return self.root / "qformer_tokenizer"

    def report(self) -> dict:
        return json.loads((self.root / "report.json").read_text())


def find_backbones(path: str | Path | None = None) -> ToyBackbones:
    """The backbone set at ``path`` (default: the one shipped in the package): a directory with
    ``vision/`` (a ``Blip2VisionModel``) and ``qformer_tokenizer/`` (BERT WordPiece with ``[DEC]``), and
    the LLMs a job uses, ``opt/`` and/or ``t5/`` (or an LLM path given to the job directly). A set of
    real checkpoints is laid out the same way; a built toy set also has ``report.json``."""
    root = Path(path) if path else PACKAGED_BACKBONES
    missing = [p for p in ("vision", "qformer_tokenizer") if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"no backbone set at {root} (missing {', '.join(missing)}); "
                                f"build the toy one with `blip2 backbones --out {root}`")
    return ToyBackbones(root)


# the toy LMs: (directory, pretraining function, transformers loader)
LANGUAGE_MODELS = (("opt", pretrain_causal_lm, AutoModelForCausalLM), ("t5", pretrain_seq2seq_lm, AutoModelForSeq2SeqLM))


def _split_images(config: ToyWorldConfig, split: str) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    records = generate_split(config, split)
    images = np.stack([decode_image(r.image) for r in records])
    return images, attribute_labels([r.attributes for r in records])


def evaluate_backbones(backbones: ToyBackbones, toyworld_seed: int = 0, probe_train_size: int = 3000,
                       probe_steps: int = 300, seed: int = 0) -> dict:
    """Load each backbone through ``from_pretrained`` and measure it on held-out data:

    - vision: a fresh linear probe on frozen pooled features, trained on freshly drawn images of the
      training attribute combinations, scored on the toy world's ``test`` and ``novel`` splits;
    - each LM: held-out perplexity and how often greedy decoding states what its context says.
    """
    vision = Blip2VisionModel.from_pretrained(backbones.vision).eval()
    image_size = vision.config.image_size
    rng = np.random.default_rng([seed, 7])
    train = sample_images(split_attributes("web"), probe_train_size, rng, image_size, jpeg_quality=92)
    world = ToyWorldConfig(seed=toyworld_seed, image_size=image_size)
    probe = linear_probe(vision, train, {s: _split_images(world, s) for s in ("test", "novel")}, probe_steps, seed)
    report = {"vision": {"probe": probe}}
    for name, _, loader in LANGUAGE_MODELS:
        model = loader.from_pretrained(getattr(backbones, name)).eval()
        tokenizer = AutoTokenizer.from_pretrained(getattr(backbones, name))
        report[name] = evaluate_language_model(model, tokenizer, all_attributes(), seed=seed + 1000)
    return report


def _size_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file of a set but its report, keyed by the path under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "report.json"}


def _provenance(config: BackbonesConfig, root: Path) -> dict:
    return {
        "seeds": {"vision": config.vision.seed, "language": config.language.seed,
                  "eval_toyworld": config.eval_toyworld_seed},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
        "deterministic_algorithms": True,
        "threads": torch.get_num_threads(),
        "sha256": file_digests(root),
    }


@contextlib.contextmanager
def _deterministic():
    """torch's deterministic mode for the build, restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _staged(out: Path):
    """A temporary sibling of ``out`` to build in, renamed into place when the block ends without error and
    removed when it fails: a crash never leaves a half-built set that a later run would take for finished."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.chmod(0o755)  # mkdtemp makes it private; a built set is meant to be shared
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@_deterministic()
def build_backbones(config: BackbonesConfig, out: str | Path, log: Callable[[str], None] = print) -> ToyBackbones:
    """Pretrain the three backbones and both tokenizers from scratch into ``out``; returns their paths.

    The vision model and the LMs are pretrained on every attribute combination, the `novel` colour x
    shape pairs included: they stand in for encoders and LLMs pretrained on web-scale data, which have
    seen every colour on every shape. What the `novel` split holds out is the *image-text* data of
    BLIP-2's own training (CapFilt, stage 1, stage 2, instruction tuning), never the backbones' data.
    The directory is written to a temporary sibling and renamed into place, so a crash never leaves a
    half-built set that a later run would take for finished.
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out = Path(out)
    timings: dict[str, float] = {}
    with _staged(out) as staging:
        texts = vocabulary_text()
        build_qformer_tokenizer(texts).save_pretrained(staging / "qformer_tokenizer")
        lm_tokenizer = build_lm_tokenizer(texts)

        start = time.perf_counter()
        log("pretraining the image encoder (attribute classification)")
        vision = pretrain_vision(config.vision, all_attributes(), log)
        vision.save_pretrained(staging / "vision")
        BlipImageProcessorPil(
            size={"height": config.vision.image_size, "width": config.vision.image_size},
            image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
        ).save_pretrained(staging / "vision")
        timings["vision"] = time.perf_counter() - start

        for name, pretrain, _ in LANGUAGE_MODELS:
            start = time.perf_counter()
            log(f"pretraining the {'decoder-only' if name == 'opt' else 'encoder-decoder'} LM ({name})")
            model = pretrain(config.language, lm_tokenizer, all_attributes(), log)
            model.save_pretrained(staging / name)
            lm_tokenizer.save_pretrained(staging / name)
            timings[name] = time.perf_counter() - start

        log("evaluating the saved backbones (loaded back with from_pretrained)")
        quality = evaluate_backbones(ToyBackbones(staging), config.eval_toyworld_seed,
                                     config.vision.probe_train_size, config.vision.probe_steps, config.vision.seed)
        report = {
            "config": asdict(config),
            "quality": quality,
            "train_seconds": {k: round(v, 1) for k, v in timings.items()},
            "safetensors_bytes": {p: _size_bytes(staging / p) for p in ("vision", "opt", "t5")},
            "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "threads": torch.get_num_threads(), "machine": platform.machine(),
                            "cpus": os.cpu_count()},
            "provenance": _provenance(config, staging),
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return ToyBackbones(out)


@_deterministic()
def build_language_variant(base: ToyBackbones, language: LanguagePretrainConfig, out: str | Path,
                           log: Callable[[str], None] = print) -> ToyBackbones:
    """A backbone set that differs from ``base`` in its LMs alone: ``base``'s image encoder, Q-Former
    tokenizer and LM tokenizer, with OPT and T5 pretrained afresh under ``language`` (another seed, or a
    family left out of their text with ``excluded_tasks``), each evaluated as :func:`evaluate_language_model`
    does (every family asked, the excluded one too). ``report.json`` records ``base``, the config, the
    LMs' quality and the provenance. Written to a staging sibling and renamed into place, as
    :func:`build_backbones` does."""
    out = Path(out)
    with _staged(out) as staging:
        for part in ("vision", "qformer_tokenizer"):
            shutil.copytree(base.root / part, staging / part)
        tokenizer = AutoTokenizer.from_pretrained(base.opt)  # the same vocabulary: only the pretraining text differs
        quality, timings = {}, {}
        for name, pretrain, loader in LANGUAGE_MODELS:
            start = time.perf_counter()
            log(f"pretraining the {name} LM" + (f" without {', '.join(language.excluded_tasks)}"
                                                if language.excluded_tasks else ""))
            pretrain(language, tokenizer, all_attributes(), log).save_pretrained(staging / name)
            tokenizer.save_pretrained(staging / name)
            timings[name] = round(time.perf_counter() - start, 1)
            model = loader.from_pretrained(staging / name).eval()
            quality[name] = evaluate_language_model(model, tokenizer, all_attributes(), seed=language.seed + 1000)
        report = {"base": str(base.root), "config": {"language": asdict(language)}, "quality": quality,
                  "train_seconds": timings, "provenance": _provenance(BackbonesConfig(language=language), staging)}
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return ToyBackbones(out)


def summary_lines(report: dict) -> list[str]:
    """Human-readable quality lines of a backbone report (the build's or a fresh evaluation)."""
    quality = report.get("quality", report)
    lines = []
    for split, accuracy in quality["vision"]["probe"].items():
        lines.append(f"image encoder, linear probe on {split:5s}: mean {accuracy['mean']:.3f}  "
                     + "  ".join(f"{n} {accuracy[n]:.3f}" for n in ATTRIBUTES))
    for name in ("opt", "t5"):
        lines.append(f"{name:3s} LM: " + "  ".join(f"{k} {quality[name][k]:.3f}" for k in LM_HEADLINE))
    return lines

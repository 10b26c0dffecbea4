"""Checkpoints in and out: standard transformers directories, and the trainable part alone.

:func:`export_blip2` / :func:`export_instructblip` write a directory that
``Blip2ForConditionalGeneration`` + ``Blip2Processor`` (or ``InstructBlipForConditionalGeneration`` +
``InstructBlipProcessor``) load with ``from_pretrained`` as is: the model's safetensors and config, the
generation config, the LLM tokenizer, the image processor and, for InstructBLIP, the Q-Former tokenizer
(in ``qformer_tokenizer/``, where ``InstructBlipProcessor`` looks for it).

:func:`import_pretrained` is the other direction, for any directory (or hub id) in that layout: what
Salesforce published (``Salesforce/blip2-opt-2.7b``, ``Salesforce/instructblip-flan-t5-xl``, ...) and
what the export writes, through the same code.

:func:`export_stage1` / :func:`import_stage1` do the same for stage 1 and ``Blip2ForImageTextRetrieval``
(ITC and ITM); the ITG head and the temperature, which that class lacks, travel in a side file.

:func:`save_trainable` / :func:`load_trainable` hold what training changes (``query_tokens``, ``qformer``,
``language_projection``) in one safetensors file, for Ray Train checkpoints: the frozen backbones are
reloaded from their own directories, never written again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor

from blip2.models.qformer import Blip2QFormerForPretraining
from blip2.models.stage2 import unwrap

STAGE1_EXTRAS = "stage1_extras.safetensors"  # ITG head and temperature, beside an exported retrieval model

FAMILIES = {"blip-2": (Blip2ForConditionalGeneration, Blip2Processor),
            "instructblip": (InstructBlipForConditionalGeneration, InstructBlipProcessor)}


@dataclass
class ModelBundle:
    """A model with everything that feeds it: what :func:`import_pretrained` and the presets return."""

    model: PreTrainedModel  # Blip2ForConditionalGeneration or InstructBlipForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase  # the LLM's
    image_processor: BaseImageProcessor
    qformer_tokenizer: PreTrainedTokenizerBase | None = None  # InstructBLIP only

    @property
    def is_instruct(self) -> bool:
        return isinstance(unwrap(self.model), InstructBlipForConditionalGeneration)

    def processor(self) -> Blip2Processor | InstructBlipProcessor:
        """The transformers processor over these parts."""
        return _processor(unwrap(self.model), self.tokenizer, self.image_processor, self.qformer_tokenizer)


def _image_processor(image_processor: str | Path | BaseImageProcessor) -> BaseImageProcessor:
    if isinstance(image_processor, (str, Path)):
        return AutoImageProcessor.from_pretrained(image_processor)
    return image_processor


def _processor(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               image_processor: str | Path | BaseImageProcessor,
               qformer_tokenizer: PreTrainedTokenizerBase | None) -> Blip2Processor | InstructBlipProcessor:
    config = model.config
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id != config.image_token_index:
        raise ValueError(f"the tokenizer's <image> id ({image_token_id}) is not the model's image_token_index "
                         f"({config.image_token_index}): the processors would insert the wrong placeholder")
    image_processor = _image_processor(image_processor)
    if isinstance(model, InstructBlipForConditionalGeneration):
        if qformer_tokenizer is None:
            raise ValueError("an InstructBLIP processor needs the Q-Former tokenizer")
        return InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     qformer_tokenizer=qformer_tokenizer, num_query_tokens=config.num_query_tokens)
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                          num_query_tokens=config.num_query_tokens)


def _export(model: PreTrainedModel, processor: Blip2Processor | InstructBlipProcessor, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def export_blip2(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 image_processor: str | Path | BaseImageProcessor, out_dir: str | Path) -> Path:
    """Write a ``Blip2ForConditionalGeneration`` (or a ``Blip2Stage2`` around one) with its processor
    to ``out_dir``; ``image_processor`` is an object or a directory holding one (the vision backbone's)."""
    model = unwrap(model)
    if not isinstance(model, Blip2ForConditionalGeneration):
        raise TypeError(f"expected a Blip2ForConditionalGeneration, got {type(model).__name__}")
    return _export(model, _processor(model, tokenizer, image_processor, None), out_dir)


def export_instructblip(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        qformer_tokenizer: PreTrainedTokenizerBase, image_processor: str | Path | BaseImageProcessor,
                        out_dir: str | Path) -> Path:
    """Write an ``InstructBlipForConditionalGeneration`` with its processor (LLM tokenizer, Q-Former
    tokenizer, image processor) to ``out_dir``."""
    model = unwrap(model)
    if not isinstance(model, InstructBlipForConditionalGeneration):
        raise TypeError(f"expected an InstructBlipForConditionalGeneration, got {type(model).__name__}")
    return _export(model, _processor(model, tokenizer, image_processor, qformer_tokenizer), out_dir)


def import_pretrained(source: str | Path, dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a BLIP-2 or InstructBLIP checkpoint in transformers' layout (a directory or a hub id) with its
    processor's parts. The family comes from the config's ``model_type``; the Q-Former stays fp32 (the
    model classes keep it so), the rest loads in ``dtype``.

    Checkpoints older than transformers' image-token processing (no ``image_token_index``) are refused
    with a clear error rather than silently mis-aligned; a processor saved without ``num_query_tokens``
    takes the model's.
    """
    config = AutoConfig.from_pretrained(source)
    if config.model_type not in FAMILIES:
        raise ValueError(f"{source}: model_type {config.model_type!r} is neither 'blip-2' nor 'instructblip'")
    if config.image_token_index is None:
        raise ValueError(f"{source}: the config has no image_token_index; re-save it with a transformers "
                         "version that expands <image> tokens (>= 4.47)")
    model_class, processor_class = FAMILIES[config.model_type]
    model = model_class.from_pretrained(source, dtype=dtype).eval()
    processor = processor_class.from_pretrained(source)
    if processor.num_query_tokens is None:
        processor.num_query_tokens = config.num_query_tokens
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token.content)
    if image_token_id != config.image_token_index:
        raise ValueError(f"{source}: the tokenizer's image token id {image_token_id} != the config's "
                         f"image_token_index {config.image_token_index}")
    return ModelBundle(model, processor.tokenizer, processor.image_processor,
                       getattr(processor, "qformer_tokenizer", None))


# ---------------------------------------------------------------------------------------------------
# Checkpoints of the trainable part.


def save_trainable(model: nn.Module, path: str | Path) -> list[str]:
    """Write the parameters that require grad (``query_tokens``, ``qformer.*``, ``language_projection.*``
    once the backbones are frozen), named as in the transformers model, to a safetensors file."""
    model = unwrap(model)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError("the model has no trainable parameters")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "content": "blip2-trainable-parameters"})
    return sorted(tensors)


def load_trainable(model: nn.Module, path: str | Path) -> list[str]:
    """Load a :func:`save_trainable` file into ``model`` in place (safetensors only, never pickle).

    Strict: every trainable parameter of ``model`` must be in the file and every tensor in the file must
    be a parameter of ``model``, with the same shape. Returns the loaded names."""
    model = unwrap(model)
    tensors = load_file(str(path))
    parameters = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(parameters))
    missing = sorted(n for n, p in parameters.items() if p.requires_grad and n not in tensors)
    if unknown or missing:
        raise KeyError(f"checkpoint does not fit the model: unknown {unknown[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.shape != parameters[name].shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(parameters[name].shape)}")
            parameters[name].copy_(tensor)
    return sorted(tensors)


_RETRIEVAL_PARTS = ("vision_model.", "query_tokens", "embeddings.", "qformer.", "vision_projection.",
                    "text_projection.", "itm_head.")


def export_stage1(model: Blip2QFormerForPretraining, out: str | Path) -> Path:
    """Write ``out`` so that ``Blip2ForImageTextRetrieval.from_pretrained(out)`` loads the model as is
    (same ITC similarities, same ITM logits); the ITG head and temperature, which that class lacks,
    go to ``out/stage1_extras.safetensors``."""
    out = Path(out)
    state = model.state_dict()
    retrieval = Blip2ForImageTextRetrieval(model.config)
    retrieval.load_state_dict({k: v for k, v in state.items() if k.startswith(_RETRIEVAL_PARTS)}, strict=True)
    retrieval.save_pretrained(out)
    extras = {k: v.contiguous() for k, v in state.items()
              if k.startswith(("itg_head.", "temp")) and k != "itg_head.word_embeddings.weight"}
    save_file(extras, out / STAGE1_EXTRAS, metadata={"dec_token_id": str(model.dec_token_id)})
    return out


def import_stage1(path: str | Path, dec_token_id: int | None = None) -> Blip2QFormerForPretraining:
    """Load a ``Blip2ForImageTextRetrieval`` directory (ours or one in Salesforce's layout) as a stage-1
    model.

    With our side file, the ITG head, the temperature and the ``[DEC]`` id come back. Without it (what
    transformers saves, e.g. ``Salesforce/blip2-itm-vit-g``), the model scores ITC and ITM as is and has
    no ITG head, unless ``dec_token_id`` is given: then a fresh ITG head is built (to train stage 1 on
    from there)."""
    path = Path(path)
    retrieval = Blip2ForImageTextRetrieval.from_pretrained(path)
    extras_path = path / STAGE1_EXTRAS
    extras = load_file(extras_path) if extras_path.exists() else {}
    if extras_path.exists() and dec_token_id is None:
        with safe_open(extras_path, "pt") as handle:
            dec_token_id = int(handle.metadata()["dec_token_id"])
    model = Blip2QFormerForPretraining(retrieval.config, retrieval.vision_model, dec_token_id)
    missing, unexpected = model.load_state_dict({**retrieval.state_dict(), **extras}, strict=False)
    # Only what Blip2ForImageTextRetrieval lacks may start fresh: the ITG head and the temperature.
    fresh = [k for k in missing if not k.startswith(("itg_head.", "temp"))]
    if fresh or unexpected:
        raise ValueError(f"{path}: the checkpoint does not fit a stage-1 model: missing {fresh[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model

"""Tiny language models for BLIP-2's frozen LLM, pretrained on toy-world text only.

BLIP-2 freezes an LLM that was pretrained long before it ever saw a Q-Former: OPT (decoder-only) and
Flan-T5 (encoder-decoder). Here both are tiny and pretrained in seconds on the toy language. A frozen LM
pretrained on captions alone ignores a learned soft prefix, so stage 2 could never train the Q-Former
through it; these LMs are therefore also pretrained to *use their context* (see
:func:`blip2.toyworld.text.lm_pretraining_example`): a bag of attribute words comes first and the caption
or answer must agree with it. The bag sits exactly where stage 2 puts the projected queries:

- decoder-only: ``bag <s> prompt target </s>`` (``Blip2Processor`` builds ``<image>*N <s> text``);
- encoder-decoder: encoder ``bag <s> prompt``, decoder ``target </s>`` (``Blip2ForConditionalGeneration``
  with T5 feeds the encoder ``queries <s> prompt``, and ``<s>`` alone when there is no prompt).

Bag tokens carry a marker, the ``<image>`` token's embedding added to theirs (the id is recorded as
``context_marker_token_id`` in the model config), so that the LM can tell a context word from the same
word in the prompt. In stage 2 the queries replace the bag, and ``language_projection``'s bias can carry
the marker (or be initialised to it).

The loss is on the target only: the bag is a random shuffle with random repeats that no model can
predict, and in stage 2 it is replaced by query embeddings that the LM never has to produce, so spending
capacity on it would only blur the context-to-text mapping that stage 2 relies on.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
    get_cosine_schedule_with_warmup,
)

from blip2.tokenization import IMAGE_TOKEN
from blip2.toyworld.text import (
    INSTRUCTION_TASKS,
    LM_TASK_WEIGHTS,
    TextExample,
    caption_matches,
    context_words,
    instruction_example,
    lm_pretraining_example,
)
from blip2.toyworld.world import Attributes


@dataclass(frozen=True)
class LanguagePretrainConfig:
    """Size and training schedule of one tiny LM (the same config builds the OPT and the T5)."""

    hidden_size: int = 128
    num_layers: int = 2  # decoder layers for OPT; encoder and decoder layers each for T5
    # 8 narrow heads rather than 4: in short single-seed runs the existence questions (compare the
    # prompt's words with the context) were learned sooner, at the same cost.
    num_heads: int = 8
    ffn_size: int = 384  # 384 rather than 512 keeps both models near 5 MB of fp32 safetensors
    # Longest sequence the LM ever sees, stage 2 included (queries + prompt + target); sizes OPT's
    # learned position table. 64 leaves room for 32 queries, the paper's count.
    max_length: int = 64
    batch_size: int = 32  # more updates for the same compute: the task is learned by steps, not data
    steps: int = 3000
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # OPT's normal-init std. OPT's 0.02 leaves the attention logits of a 128-wide model near zero for
    # hundreds of steps; 0.1 shortened that plateau. (T5 keeps its own fan-in-scaled init.)
    opt_init_std: float = 0.1
    # OPT learns absolute positions, and pretraining sequences are at most ~30 tokens long, so positions
    # further out would stay untrained - yet stage 2 puts num_query_tokens queries before the text. A
    # random start offset per sequence trains every position below max_length. (T5 is relative.)
    random_position_offset: bool = True
    # Add the <image> token's embedding to every bag token, so the LM can tell context from text even
    # when a bag word and a prompt word are the same token ("is there a red circle?"). Stage 2's
    # queries are never words anyway; the projection can learn to carry the same marker.
    context_marker: bool = True
    # Soft context (off in the shipped set). Stage 2 puts projected Q-Former queries where the bag was:
    # vectors that need not be any word's embedding, each free to carry several attributes at once. An
    # LM pretrained on exact word embeddings *copies* from such vectors (captions) but fails to compare
    # them with a question's words (zero-shot "is there a red circle?"). With probability
    # ``context_mixing`` a sequence's bag slots become random convex mixtures of its bag words'
    # embeddings, and every bag slot gets Gaussian noise of ``context_noise`` times the embeddings' RMS,
    # so both skills must work on vectors near, not equal to, word embeddings. Measured (one seed each,
    # 0.5 / 0.5, 4,000 steps): the stage-2 model answered the existence questions with 0.69 accuracy
    # instead of 0.50, yet instruction tuning still brought it back to chance; not robust enough to ship.
    # With the held-in ``verify`` family in the mixture it did not help either (0.54 vs 0.66 without it).
    context_mixing: float = 0.0
    context_noise: float = 0.0
    # Instruction families left out of the LM's pretraining text (e.g. ["existence"]: then a held-out
    # family is unseen by the LM too, not only by instruction tuning). Evaluation still asks every family.
    excluded_tasks: tuple[str, ...] = ()
    log_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "ffn_size", "batch_size", "steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.max_length < 32:
            raise ValueError(f"max_length must be >= 32 (pretraining text reaches ~30 tokens), got {self.max_length}")
        if set(self.excluded_tasks) - set(LM_TASK_WEIGHTS) or set(self.excluded_tasks) >= set(LM_TASK_WEIGHTS):
            raise ValueError(f"excluded_tasks must name some, not all, of {', '.join(LM_TASK_WEIGHTS)}; "
                             f"got {list(self.excluded_tasks)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not self.opt_init_std > 0:
            raise ValueError(f"opt_init_std must be > 0, got {self.opt_init_std}")
        if not 0 <= self.context_mixing <= 1:
            raise ValueError(f"context_mixing must be in [0, 1], got {self.context_mixing}")
        if self.context_noise < 0:
            raise ValueError(f"context_noise must be >= 0, got {self.context_noise}")
        if (self.context_mixing or self.context_noise) and not self.context_marker:
            raise ValueError("context_mixing and context_noise act on the marked bag: set context_marker=true")


def _marker_id(config: LanguagePretrainConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if config.context_marker else None


def build_opt_config(config: LanguagePretrainConfig, tokenizer: PreTrainedTokenizerBase) -> OPTConfig:
    """A tiny OPT with tied embeddings, no dropout, and the tokenizer's special-token ids."""
    return OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        word_embed_proj_dim=config.hidden_size,  # no project_in / project_out (only opt-350m has them)
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        ffn_dim=config.ffn_size,
        max_position_embeddings=config.max_length,
        do_layer_norm_before=True,
        init_std=config.opt_init_std,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        context_marker_token_id=_marker_id(config, tokenizer),
    )


def build_t5_config(config: LanguagePretrainConfig, tokenizer: PreTrainedTokenizerBase) -> T5Config:
    """A tiny T5 (v1.0 layout: ReLU FFN, tied and rescaled output embedding), decoder started by pad.

    ``bos_token_id`` is set because ``Blip2ForConditionalGeneration.generate`` without ``input_ids``
    starts the encoder input from it.
    """
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=config.hidden_size,
        d_kv=config.hidden_size // config.num_heads,
        d_ff=config.ffn_size,
        num_layers=config.num_layers,
        num_decoder_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_max_distance=config.max_length,
        feed_forward_proj="relu",
        dropout_rate=0.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        context_marker_token_id=_marker_id(config, tokenizer),
    )


# ---------------------------------------------------------------------------------------------------
# Batches.


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one :class:`TextExample`: ``context`` (no specials), ``<s> prompt``, ``target </s>``."""

    context_ids: list[int]
    prompt_ids: list[int]
    target_ids: list[int]


def encode_examples(examples: list[TextExample], tokenizer: PreTrainedTokenizerBase) -> list[EncodedExample]:
    """Tokenize the three parts separately, so the target span is exact (the byte-level BPE gives every
    word its own leading space, so the parts concatenate to what the whole text would tokenize to)."""
    contexts = tokenizer([e.context for e in examples], add_special_tokens=False)["input_ids"]
    prompts = tokenizer([e.prompt for e in examples])["input_ids"]  # "<s> prompt", or "<s>" alone
    targets = tokenizer([e.target for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [EncodedExample(c, p, t + [eos]) for c, p, t in zip(contexts, prompts, targets, strict=True)]


def _left_pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[value] * (width - len(s)) + s for s in sequences], dtype=torch.long)


def _right_pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def _check_length(sequences: list[list[int]], max_length: float) -> None:
    longest = max(len(s) for s in sequences)
    if longest > max_length:
        raise ValueError(f"a sequence of {longest} tokens exceeds max_length={max_length}")


def causal_batch(encoded: list[EncodedExample], pad_token_id: int, max_length: float,
                 offset_rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Left-padded ``bag <s> prompt target </s>`` with labels on the target only.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (-100 outside targets), ``position_ids`` and
    ``context_mask`` (True on bag tokens), each (B, T). With ``offset_rng``, every sequence starts at a
    random position in ``[0, max_length - length]``; otherwise at 0, as OPT itself would number it.
    """
    sequences = [e.context_ids + e.prompt_ids + e.target_ids for e in encoded]
    _check_length(sequences, max_length)
    labels = [[-100] * (len(e.context_ids) + len(e.prompt_ids)) + e.target_ids for e in encoded]
    attention_mask = _left_pad([[1] * len(s) for s in sequences], 0)  # (B, T)
    lengths = np.array([len(s) for s in sequences])
    offsets = np.zeros_like(lengths) if offset_rng is None else offset_rng.integers(0, max_length - lengths + 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0) + torch.from_numpy(offsets)[:, None]
    context = [[1] * len(e.context_ids) + [0] * (len(e.prompt_ids) + len(e.target_ids)) for e in encoded]
    return {"input_ids": _left_pad(sequences, pad_token_id), "attention_mask": attention_mask,
            "labels": _left_pad(labels, -100), "position_ids": position_ids,
            "context_mask": _left_pad(context, 0).bool()}


def source_batch(encoded: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``bag <s> prompt``, left-padded (as the BLIP-2 processor pads): what a T5 encoder reads and what
    generation starts from. ``input_ids``, ``attention_mask``, ``context_mask``, each (B, S)."""
    sources = [e.context_ids + e.prompt_ids for e in encoded]
    context = [[1] * len(e.context_ids) + [0] * len(e.prompt_ids) for e in encoded]
    return {"input_ids": _left_pad(sources, pad_token_id),
            "attention_mask": _left_pad([[1] * len(s) for s in sources], 0),
            "context_mask": _left_pad(context, 0).bool()}


def seq2seq_batch(encoded: list[EncodedExample], pad_token_id: int, max_length: float) -> dict[str, torch.Tensor]:
    """:func:`source_batch` plus ``labels`` ``target </s>``, (B, T), right-padded with -100 (T5 shifts
    them right behind ``decoder_start_token_id`` itself)."""
    _check_length([e.context_ids + e.prompt_ids for e in encoded] + [e.target_ids for e in encoded], max_length)
    return {**source_batch(encoded, pad_token_id), "labels": _right_pad([e.target_ids for e in encoded], -100)}


def soften_context(embeds: torch.Tensor, context_mask: torch.Tensor, mixing: float, noise: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Bag-slot embeddings made soft (see ``LanguagePretrainConfig.context_noise``); other positions as is.

    Args:
        embeds: (B, S, H) token embeddings.
        context_mask: (B, S), True on bag positions.
        mixing: probability that a sequence's bag slots become random convex mixtures of its bag words
            (weights ~ Dirichlet(1) over the sequence's bag positions).
        noise: std of the Gaussian noise added to every bag slot, relative to the embeddings' RMS.
    """
    context = context_mask.to(embeds.dtype)  # (B, S)
    if mixing > 0:
        # Row-stochastic weights over each sequence's own bag positions: exponential draws normalised
        # per row are Dirichlet(1).
        draws = -torch.log(torch.rand(embeds.shape[0], embeds.shape[1], embeds.shape[1], generator=generator,
                                      dtype=embeds.dtype).clamp_min(1e-12)) * context[:, None, :]  # (B, S, S)
        weights = draws / draws.sum(-1, keepdim=True).clamp_min(1e-12)
        mixed = weights @ embeds  # (B, S, H)
        chosen = (torch.rand(embeds.shape[0], 1, 1, generator=generator) < mixing).to(embeds.dtype)  # (B, 1, 1)
        slot = context[..., None] * chosen
        embeds = embeds * (1 - slot) + mixed * slot
    if noise > 0:
        scale = noise * embeds.detach().pow(2).mean().sqrt()
        embeds = embeds + context[..., None] * scale * torch.randn(embeds.shape, generator=generator,
                                                                   dtype=embeds.dtype)
    return embeds


def model_inputs(model: PreTrainedModel, batch: dict[str, torch.Tensor],
                 soften: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``model(...)`` / ``model.generate(...)`` from a batch.

    A model whose config names a ``context_marker_token_id`` reads embeddings: the token embeddings plus
    that token's embedding on the bag positions, (B, S, H). Otherwise plain ``input_ids``. ``soften``
    (pretraining only) maps the word embeddings and the context mask to softened ones before the
    marker is added.
    """
    inputs = {name: value for name, value in batch.items() if name != "context_mask"}
    marker = getattr(model.config, "context_marker_token_id", None)
    if marker is not None:
        embeddings = model.get_input_embeddings()
        context = batch["context_mask"].unsqueeze(-1).to(embeddings.weight.dtype)  # (B, S, 1)
        words = embeddings(inputs.pop("input_ids"))  # (B, S, H)
        if soften is not None:
            words = soften(words, batch["context_mask"])
        inputs["inputs_embeds"] = words + context * embeddings.weight[marker]
    return inputs


# ---------------------------------------------------------------------------------------------------
# Pretraining.


def _draw_examples(attributes: list[Attributes], rng: np.random.Generator, n: int,
                   excluded_tasks: tuple[str, ...] = ()) -> list[TextExample]:
    weights = {task: w for task, w in LM_TASK_WEIGHTS.items() if task not in excluded_tasks}
    return [lm_pretraining_example(attributes[i], rng, weights) for i in rng.integers(len(attributes), size=n)]


def _train(model: PreTrainedModel, next_batch: Callable[[], dict[str, torch.Tensor]],
           config: LanguagePretrainConfig, log: Callable[[str], None], name: str) -> None:
    """AdamW with linear warmup and cosine decay; weight decay on matrices only (nanoGPT's rule)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(0.9, 0.98),
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    soften = None
    if config.context_mixing or config.context_noise:
        soften = functools.partial(soften_context, mixing=config.context_mixing, noise=config.context_noise,
                                   generator=torch.Generator().manual_seed(config.seed))
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(1, config.steps + 1):
        loss = model(**model_inputs(model, next_batch(), soften)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % config.log_every == 0 or step == config.steps:
            count = step % config.log_every or config.log_every
            log(f"{name} step {step}/{config.steps} loss {running / count:.4f} "
                f"lr {schedule.get_last_lr()[0]:.2e} {time.perf_counter() - start:.1f}s")
            running = 0.0
    model.eval()


def pretrain_causal_lm(config: LanguagePretrainConfig, tokenizer: PreTrainedTokenizerBase,
                       attributes: list[Attributes], log: Callable[[str], None] = print) -> OPTForCausalLM:
    """Pretrain a tiny OPT from scratch on text drawn on the fly; returned in eval mode, fp32."""
    torch.manual_seed(config.seed)
    model = OPTForCausalLM(build_opt_config(config, tokenizer)).float()
    rng = np.random.default_rng(config.seed)
    offset_rng = rng if config.random_position_offset else None

    def next_batch() -> dict[str, torch.Tensor]:
        encoded = encode_examples(_draw_examples(attributes, rng, config.batch_size, config.excluded_tasks), tokenizer)
        return causal_batch(encoded, tokenizer.pad_token_id, config.max_length, offset_rng)

    _train(model, next_batch, config, log, "opt")
    return model


def pretrain_seq2seq_lm(config: LanguagePretrainConfig, tokenizer: PreTrainedTokenizerBase,
                        attributes: list[Attributes], log: Callable[[str], None] = print) -> T5ForConditionalGeneration:
    """Pretrain a tiny T5 from scratch on text drawn on the fly; returned in eval mode, fp32."""
    torch.manual_seed(config.seed)
    model = T5ForConditionalGeneration(build_t5_config(config, tokenizer)).float()
    rng = np.random.default_rng(config.seed)

    def next_batch() -> dict[str, torch.Tensor]:
        encoded = encode_examples(_draw_examples(attributes, rng, config.batch_size, config.excluded_tasks), tokenizer)
        return seq2seq_batch(encoded, tokenizer.pad_token_id, config.max_length)

    _train(model, next_batch, config, log, "t5")
    return model


# ---------------------------------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def _target_nll(model: PreTrainedModel, encoded: list[EncodedExample], pad_token_id: int,
                max_length: float) -> tuple[float, int]:
    """Summed negative log-likelihood of the target tokens, and their number."""
    if model.config.is_encoder_decoder:
        batch = seq2seq_batch(encoded, pad_token_id, max_length)
        logits = model(**model_inputs(model, batch)).logits  # (B, T_target, V)
        labels = batch.pop("labels")
    else:
        batch = causal_batch(encoded, pad_token_id, max_length)
        labels = batch.pop("labels")[:, 1:]
        logits = model(**model_inputs(model, batch)).logits[:, :-1]  # (B, T-1, V)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="sum")
    return nll.item(), int((labels != -100).sum())


@torch.no_grad()
def generate_targets(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, contexts: list[str],
                     prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy completions of ``context <s> prompt``: the caption or answer each one leads to."""
    encoded = encode_examples([TextExample(c, "", p) for c, p in zip(contexts, prompts, strict=True)], tokenizer)
    inputs = model_inputs(model, source_batch(encoded, tokenizer.pad_token_id))
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if "input_ids" in inputs and not model.config.is_encoder_decoder:
        output = output[:, inputs["input_ids"].shape[1]:]  # decoder-only generate() returns the prompt too
    return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]


def evaluate_language_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                            attributes: list[Attributes], seed: int, num_examples: int = 400,
                            batch_size: int = 100) -> dict[str, float]:
    """Held-out metrics of a pretrained LM (draws from ``seed``, which should differ from training's).

    - ``perplexity``: token-level, over the targets of ``num_examples`` pretraining examples.
    - ``context_accuracy``: greedy caption from the bag of attribute words alone, scored with
      ``caption_matches`` (all four attributes right). A model that ignores its context is at chance,
      1 / len(attributes); this is the number that says stage 2 can steer the LM.
    - ``answer_accuracy`` and ``answer_accuracy/<task>``: exact answers to ``bag <s> instruction``.
    """
    if model.training:
        raise ValueError("evaluate the model in eval mode (call model.eval())")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("evaluate the model in float32")
    # OPT cannot read past its position table; T5's relative positions have no such limit.
    max_length = getattr(model.config, "max_position_embeddings", math.inf)
    nll, count = 0.0, 0
    rng = np.random.default_rng([seed, 0])
    for start in range(0, num_examples, batch_size):
        examples = _draw_examples(attributes, rng, min(batch_size, num_examples - start))
        batch_nll, batch_count = _target_nll(model, encode_examples(examples, tokenizer), tokenizer.pad_token_id,
                                             max_length)
        nll, count = nll + batch_nll, count + batch_count

    rng = np.random.default_rng([seed, 1])
    drawn = [attributes[i] for i in rng.integers(len(attributes), size=num_examples)]
    bags = [context_words(a, rng) for a in drawn]
    tasks = [tuple(INSTRUCTION_TASKS)[i] for i in rng.integers(len(INSTRUCTION_TASKS), size=num_examples)]
    questions = [instruction_example(t, a, rng) for t, a in zip(tasks, drawn, strict=True)]
    captions, answers = [], []
    for start in range(0, num_examples, batch_size):
        part = slice(start, start + batch_size)
        captions += generate_targets(model, tokenizer, bags[part], [""] * len(bags[part]))
        answers += generate_targets(model, tokenizer, bags[part], [q.instruction for q in questions[part]])

    metrics = {
        "perplexity": math.exp(nll / count),
        "context_accuracy": float(np.mean([caption_matches(c, a) for c, a in zip(captions, drawn, strict=True)])),
    }
    correct = np.array([a == q.answer for a, q in zip(answers, questions, strict=True)])
    metrics["answer_accuracy"] = float(correct.mean())
    for task in INSTRUCTION_TASKS:
        chosen = np.array([t == task for t in tasks])
        if chosen.any():
            metrics[f"answer_accuracy/{task}"] = float(correct[chosen].mean())
    return metrics

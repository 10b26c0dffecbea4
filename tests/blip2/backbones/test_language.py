"""The tiny language models: batch layout, a reduced-budget pretraining that must learn to use its
context, and a save / load round trip through transformers' Auto classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from blip2.backbones.language import (
    LanguagePretrainConfig,
    causal_batch,
    encode_examples,
    evaluate_language_model,
    model_inputs,
    pretrain_causal_lm,
    pretrain_seq2seq_lm,
    seq2seq_batch,
    soften_context,
)
from blip2.tokenization import IMAGE_TOKEN, build_lm_tokenizer
from blip2.toyworld.corpus import split_attributes
from blip2.toyworld.text import TextExample, lm_pretraining_example, vocabulary_text

# About 5 s per model on one core; the defaults take about a minute each.
SMALL = LanguagePretrainConfig(hidden_size=64, num_heads=4, ffn_size=128, steps=250, warmup_steps=20,
                               learning_rate=3e-3)


@pytest.fixture(scope="module")
def tokenizer():
    return build_lm_tokenizer(vocabulary_text())


@pytest.fixture(scope="module")
def trained(tokenizer):
    """Both LMs pretrained on the small budget, with their held-out metrics."""
    attributes = split_attributes("web")
    models = {"opt": pretrain_causal_lm(SMALL, tokenizer, attributes, log=lambda _: None),
              "t5": pretrain_seq2seq_lm(SMALL, tokenizer, attributes, log=lambda _: None)}
    metrics = {name: evaluate_language_model(model, tokenizer, attributes, seed=1, num_examples=200)
               for name, model in models.items()}
    return models, metrics


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        LanguagePretrainConfig(hidden_size=130, num_heads=4)
    with pytest.raises(ValueError, match="warmup_steps"):
        LanguagePretrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="max_length"):
        LanguagePretrainConfig(max_length=16)
    with pytest.raises(ValueError, match="context_mixing"):
        LanguagePretrainConfig(context_mixing=1.5)
    with pytest.raises(ValueError, match="context_noise"):
        LanguagePretrainConfig(context_noise=-0.1)
    with pytest.raises(ValueError, match="context_marker"):
        LanguagePretrainConfig(context_marker=False, context_noise=0.5)
    with pytest.raises(ValueError, match="excluded_tasks must name some, not all"):
        LanguagePretrainConfig(excluded_tasks=("exists",))


def test_an_excluded_family_never_appears_in_the_pretraining_text():
    """``excluded_tasks`` (default none): C8's LM build without ``existence``; the default draws are
    unchanged (the shipped LMs were built before the switch existed)."""
    from blip2.backbones.language import _draw_examples
    from blip2.toyworld.text import INSTRUCTION_TASKS

    attributes = split_attributes("web")
    assert LanguagePretrainConfig().excluded_tasks == ()
    default = _draw_examples(attributes, np.random.default_rng(0), 300)
    assert default == [lm_pretraining_example(attributes[i], rng) for rng in [np.random.default_rng(0)]
                       for i in rng.integers(len(attributes), size=300)]
    openings = tuple(p.split("{")[0] for p in INSTRUCTION_TASKS["existence"])  # "is there a ", ...

    def existence_asked(examples):
        return sum(e.prompt.startswith(openings) for e in examples)

    assert existence_asked(default) > 20
    without = _draw_examples(attributes, np.random.default_rng(0), 300, excluded_tasks=("existence",))
    assert existence_asked(without) == 0 and sum(bool(e.prompt) for e in without) > 100


def _bags() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded sequences whose tokens are one-hot vectors (token i = e_i), and their bag masks:
    the first has bag positions 1-3, the second 2-3."""
    embeds = torch.eye(6).expand(2, 6, 6).clone()  # (B=2, S=6, H=6)
    context = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    return embeds, context


def test_soft_context_mixes_each_bag_slot_from_its_own_bag_words_and_leaves_the_rest():
    embeds, context = _bags()
    mixed = soften_context(embeds, context, mixing=1.0, noise=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed[~context], embeds[~context])  # prompt, target and padding untouched
    for b in range(2):
        bag = context[b]
        for position in bag.nonzero().flatten():
            slot = mixed[b, position]  # a convex combination of this sequence's bag words, and of nothing else
            assert torch.all(slot >= 0) and slot[bag].sum() == pytest.approx(1.0) and slot[~bag].abs().sum() == 0
    assert not torch.equal(mixed[context], embeds[context])


def test_soft_context_noise_is_on_bag_slots_only_at_the_asked_scale():
    embeds = torch.randn(4, 10, 64, generator=torch.Generator().manual_seed(1))
    context = torch.zeros(4, 10, dtype=torch.bool)
    context[:, 2:6] = True
    noisy = soften_context(embeds, context, mixing=0.0, noise=0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(noisy[~context], embeds[~context])
    ratio = ((noisy - embeds)[context].pow(2).mean() / embeds.pow(2).mean()).sqrt()
    assert ratio.item() == pytest.approx(0.5, rel=0.15)
    # mixing 0 and noise 0 is the identity: exact word embeddings
    same = soften_context(embeds, context, 0.0, 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(same, embeds)


def test_causal_batch_puts_the_bag_before_bos_and_the_loss_on_the_target_only(tokenizer):
    example = TextExample("red circle red", "red", prompt="what colour is the shape?")
    batch = causal_batch(encode_examples([example, TextExample("", "a small red circle on the left")], tokenizer),
                         tokenizer.pad_token_id, max_length=64)
    ids, labels, context = batch["input_ids"][0], batch["labels"][0], batch["context_mask"][0]
    tokens = tokenizer.convert_ids_to_tokens(ids[batch["attention_mask"][0].bool()])
    assert tokens[:4] == ["Ġred", "Ġcircle", "Ġred", "<s>"]  # bag first, where stage 2 puts the queries
    assert tokens[-2:] == ["Ġred", "</s>"]
    assert context.sum() == 3 and context[ids == tokenizer.bos_token_id].sum() == 0
    trained_on = labels[labels != -100].tolist()
    assert trained_on == tokenizer("red", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert batch["position_ids"][0, -1] == batch["attention_mask"][0].sum() - 1  # no offset unless asked


def test_seq2seq_batch_feeds_the_encoder_bag_and_prompt_and_the_decoder_the_target(tokenizer):
    batch = seq2seq_batch(encode_examples([TextExample("large large", "large", "how big is the shape?")], tokenizer),
                          tokenizer.pad_token_id, max_length=64)
    source = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert source[:3] == ["Ġlarge", "Ġlarge", "<s>"] and "Ġbig" in source
    assert tokenizer.decode(batch["labels"][0]) == " large</s>"


def test_sequences_longer_than_max_length_are_refused(tokenizer):
    too_long = TextExample(" ".join(["red"] * 40), "a small red circle on the left")
    with pytest.raises(ValueError, match="exceeds max_length"):
        causal_batch(encode_examples([too_long], tokenizer), tokenizer.pad_token_id, max_length=32)


@pytest.mark.parametrize("soft", [0.0, 0.5])
def test_pretraining_is_deterministic(tokenizer, soft):
    config = LanguagePretrainConfig(hidden_size=32, num_heads=2, ffn_size=64, steps=3, warmup_steps=1, batch_size=4,
                                    context_mixing=soft, context_noise=soft)
    attributes = split_attributes("web")
    first = pretrain_causal_lm(config, tokenizer, attributes, log=lambda _: None).state_dict()
    second = pretrain_causal_lm(config, tokenizer, attributes, log=lambda _: None).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_small_pretraining_learns_the_language_and_to_use_its_context(trained, tokenizer, name):
    models, metrics = trained
    result = metrics[name]
    # Uniform over the vocabulary is 512; the floor of this text is about 1.3.
    assert result["perplexity"] < 2.0, result
    # A model that ignores its context can only guess: 1 in 350 attribute combinations.
    assert result["context_accuracy"] >= 0.5, result
    for task in ("colour", "shape", "size", "position"):  # answers copied from the context
        assert result[f"answer_accuracy/{task}"] >= 0.8, result
    model = models[name]
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())


def test_evaluation_refuses_a_model_in_training_mode(trained, tokenizer):
    model = trained[0]["opt"]
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            evaluate_language_model(model, tokenizer, split_attributes("web"), seed=0, num_examples=2)
    finally:
        model.eval()


@pytest.mark.parametrize("name, auto", [("opt", AutoModelForCausalLM), ("t5", AutoModelForSeq2SeqLM)])
def test_save_and_load_round_trip(trained, tokenizer, tmp_path, name, auto):
    model = trained[0][name]
    model.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.config.context_marker_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rng = np.random.default_rng(0)
    examples = [lm_pretraining_example(a, rng) for a in split_attributes("web")[:16]]
    make_batch = causal_batch if name == "opt" else seq2seq_batch
    batch = make_batch(encode_examples(examples, tokenizer), tokenizer.pad_token_id, 64)
    with torch.no_grad():
        expected = model(**model_inputs(model, batch)).logits
        actual = loaded(**model_inputs(loaded, batch)).logits
    assert torch.equal(expected, actual)

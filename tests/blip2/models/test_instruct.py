"""InstructBLIP built from a toy stage-2 model: weight transfer, the instruction's path, batches, answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Blip2Config, Blip2ForImageTextRetrieval, InstructBlipForConditionalGeneration

from blip2.backbones.build import find_backbones
from blip2.backbones.vision import pixel_values
from blip2.models.generation import GenerationParams, generate_answers
from blip2.models.instruct import build_instruct_batch, build_instruct_model, encode_qformer_instructions
from blip2.models.qformer import build_qformer_config
from blip2.models.stage2 import Blip2Stage2, build_stage2_model
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from blip2.toyworld.world import decode_image

N = 8


@pytest.fixture(scope="module")
def toy():
    backbones = find_backbones()
    tokenizer = AutoTokenizer.from_pretrained(backbones.opt)
    qformer_tokenizer = AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)
    records = generate_split(ToyWorldConfig(seed=6, clean_size=8), "clean")
    images = np.stack([decode_image(r.image) for r in records])
    return backbones, tokenizer, qformer_tokenizer, pixel_values(images)


def stage2(toy, llm="opt"):
    backbones, tokenizer, qformer_tokenizer, _ = toy
    torch.manual_seed(0)
    qformer_config = build_qformer_config(128, len(qformer_tokenizer), use_qformer_text_input=False)
    return build_stage2_model(backbones.vision, getattr(backbones, llm), qformer_config, N,
                              tokenizer.convert_tokens_to_ids("<image>"))


def stage1_state_dict(model, vocab_size, seed=1):
    """A stage-1 checkpoint as stage 1 writes it: Blip2ForImageTextRetrieval names, text branch on."""
    torch.manual_seed(seed)
    qformer = build_qformer_config(128, vocab_size, use_qformer_text_input=True)
    config = Blip2Config(vision_config=model.config.vision_config.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=model.config.text_config.to_dict(), num_query_tokens=N)
    return Blip2ForImageTextRetrieval(config).state_dict()


def test_build_instruct_model_carries_stage2_weights_over(toy):
    qformer_tokenizer = toy[2]
    source = stage2(toy)
    model = build_instruct_model(Blip2Stage2(source), qformer_tokenizer)
    assert isinstance(model, InstructBlipForConditionalGeneration)
    assert model.config.qformer_config.vocab_size == len(qformer_tokenizer)
    assert model.config.num_query_tokens == N and model.config.image_token_index == source.config.image_token_index
    # Frozen parts are shared, not copied; trainable parts are equal copies.
    assert model.language_model is source.language_model
    assert model.vision_model.post_layernorm.weight.data_ptr() == source.vision_model.post_layernorm.weight.data_ptr()
    assert torch.equal(model.query_tokens, source.query_tokens)
    assert model.query_tokens.data_ptr() != source.query_tokens.data_ptr()
    assert torch.equal(model.language_projection.weight, source.language_projection.weight)
    ours, theirs = model.qformer.state_dict(), source.qformer.state_dict()
    assert torch.equal(ours["embeddings.layernorm.weight"], theirs["layernorm.weight"])
    for name in ("encoder.layer.0.attention.attention.query.weight",
                 "encoder.layer.1.crossattention.output.dense.bias", "encoder.layer.1.intermediate_query.dense.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    # No stage 1: the text FFN starts as the query FFN.
    for text in ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.1.output.LayerNorm.bias"):
        query = text.replace(".intermediate.", ".intermediate_query.").replace(".output.", ".output_query.")
        assert torch.equal(ours[text], theirs[query]), text


def test_stage1_text_weights_fill_the_qformer_text_side(toy):
    source = stage2(toy)
    state = stage1_state_dict(source, len(toy[2]))
    model = build_instruct_model(source, toy[2], stage1_state_dict=state)
    ours = model.qformer.state_dict()
    assert torch.equal(ours["embeddings.word_embeddings.weight"], state["embeddings.word_embeddings.weight"])
    assert torch.equal(ours["embeddings.position_embeddings.weight"], state["embeddings.position_embeddings.weight"])
    name = "encoder.layer.1.output.dense.weight"
    assert torch.equal(ours[name], state["qformer." + name])
    # The query side still comes from stage 2, which training moved on from stage 1.
    assert torch.equal(ours["encoder.layer.1.output_query.dense.weight"],
                       source.qformer.state_dict()["encoder.layer.1.output_query.dense.weight"])


def test_the_instruction_steers_the_queries_and_only_queries_reach_the_llm(toy):
    _, _, qformer_tokenizer, px = toy
    model = build_instruct_model(stage2(toy), qformer_tokenizer).eval()
    instructions = ["what colour is the shape?", "where is the shape?", "what colour is the shape?"]
    ids, mask = encode_qformer_instructions(qformer_tokenizer, instructions, max_length=None)
    images = px[[0, 0, 0]]
    with torch.no_grad():
        features = model.get_image_features(images, qformer_input_ids=ids, qformer_attention_mask=mask).pooler_output
        alone = model.get_image_features(images[:1], qformer_input_ids=ids[1:2],
                                         qformer_attention_mask=mask[1:2]).pooler_output
    assert features.shape == (3, N, model.config.text_config.hidden_size)  # query outputs only
    assert torch.allclose(features[0], features[2]) and not torch.allclose(features[0], features[1], atol=1e-4)
    assert torch.allclose(features[1], alone[0], atol=1e-5)  # right padding leaves positions where they were


def test_instruct_batch_truncates_from_the_left_with_configurable_lengths(toy):
    _, tokenizer, qformer_tokenizer, px = toy
    model = build_instruct_model(stage2(toy), qformer_tokenizer)
    long = "describe the image. tell me the colour of the shape."
    batch = build_instruct_batch(tokenizer, qformer_tokenizer, model.config, px[:2], [long, "name the shape"],
                                 ["red", "a small red circle on the left"], max_qformer_length=6, max_text_length=5,
                                 max_target_length=4)
    assert qformer_tokenizer.decode(batch.qformer_input_ids[0]) == "[CLS] of the shape. [SEP]"
    assert batch.qformer_input_ids.shape[1] == 6
    assert qformer_tokenizer.decode(batch.qformer_input_ids[1, :5]) == "[CLS] name the shape [SEP]"
    assert batch.qformer_input_ids[1, 5] == qformer_tokenizer.pad_token_id
    assert batch.qformer_attention_mask[1].tolist() == [1, 1, 1, 1, 1, 0]  # right-padded
    assert tokenizer.decode(batch.input_ids[0, N:][batch.attention_mask[0, N:].bool()][:5]) == "<s> of the shape."
    assert tokenizer.decode(batch.labels[1][batch.labels[1] != -100]) == " a small red circle"  # cut, no </s>
    assert (batch.input_ids[:, :N] == model.config.image_token_index).all()


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_instruction_tuning_step_trains_the_qformer_text_side_and_keeps_backbones_frozen(toy, llm):
    _, tokenizer, qformer_tokenizer, px = toy
    wrapper = Blip2Stage2(build_instruct_model(stage2(toy, llm), qformer_tokenizer)).train()
    assert not wrapper.model.language_model.training and not wrapper.model.vision_model.training
    batch = build_instruct_batch(tokenizer, qformer_tokenizer, wrapper.model.config, px[:4],
                                 ["what colour is the shape?"] * 2 + ["name the shape."] * 2,
                                 ["red", "blue", "circle", "star"])
    loss = wrapper(**batch.model_inputs()).lm_loss
    loss.backward()
    assert torch.isfinite(loss)
    assert wrapper.model.qformer.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert wrapper.model.qformer.encoder.layer[0].intermediate.dense.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in wrapper.model.language_model.parameters())


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_batched_answers_with_different_instructions_equal_one_at_a_time(toy, llm):
    _, tokenizer, qformer_tokenizer, px = toy
    model = build_instruct_model(stage2(toy, llm), qformer_tokenizer).eval()
    instructions = ["what colour is the shape?", "describe the image.", "is there a red circle?", "name the shape."]
    params = GenerationParams(max_new_tokens=8)
    batched = generate_answers(model, tokenizer, px[:4], instructions, params, qformer_tokenizer=qformer_tokenizer)
    alone = [generate_answers(model, tokenizer, px[i:i + 1], [q], params, qformer_tokenizer=qformer_tokenizer)[0]
             for i, q in enumerate(instructions)]
    # an untrained Q-Former may well make the LLM stop at once on one image; not on all of them
    assert batched == alone and sum(map(bool, batched)) >= 3, batched
    beams = generate_answers(model, tokenizer, px[:2], instructions[:2],
                             GenerationParams(num_beams=3, max_new_tokens=8), qformer_tokenizer=qformer_tokenizer)
    assert len(beams) == 2
    with pytest.raises(ValueError, match="Q-Former's tokenizer"):
        generate_answers(model, tokenizer, px[:1], instructions[:1], params)

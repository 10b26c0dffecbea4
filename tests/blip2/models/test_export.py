"""Export to, and import from, transformers' own BLIP-2 / InstructBLIP layout; and the presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    OPTConfig,
    T5Config,
)

from blip2.backbones.build import find_backbones
from blip2.backbones.vision import pixel_values
from blip2.models import presets
from blip2.models.export import (
    ModelBundle,
    export_blip2,
    export_instructblip,
    import_pretrained,
    load_trainable,
    save_trainable,
)
from blip2.models.generation import GenerationParams, decode, generate_answers, generate_ids
from blip2.models.instruct import build_instruct_model
from blip2.models.qformer import build_qformer_config
from blip2.models.stage2 import Blip2Stage2, build_stage2_model
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from blip2.toyworld.world import decode_image

STAGE2_QFORMER = build_qformer_config(128, 326, use_qformer_text_input=False)
N = 8
PROMPTS = ["", "what colour is the shape?", "a", "describe the image.", "", "where is the shape?"]
GREEDY = dict(max_new_tokens=10, do_sample=False, num_beams=1)


@pytest.fixture(scope="module")
def toy():
    backbones = find_backbones()
    tokenizer = AutoTokenizer.from_pretrained(backbones.opt)
    qformer_tokenizer = AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)
    records = generate_split(ToyWorldConfig(seed=7, clean_size=len(PROMPTS)), "clean")
    images = np.stack([decode_image(r.image) for r in records])
    return backbones, tokenizer, qformer_tokenizer, images


def stage2(toy, llm):
    backbones, tokenizer, qformer_tokenizer, _ = toy
    torch.manual_seed(0)
    qformer_config = build_qformer_config(128, len(qformer_tokenizer), use_qformer_text_input=False)
    return build_stage2_model(backbones.vision, getattr(backbones, llm), qformer_config, N,
                              tokenizer.convert_tokens_to_ids("<image>")).eval()


def new_tokens(model, generated, input_ids):
    """transformers' decoder-only generate() returns the prompt too. (Ask the text config: unlike
    Blip2Config, InstructBlipConfig has no is_encoder_decoder of its own and says False for T5.)"""
    return generated if model.config.text_config.is_encoder_decoder else generated[:, input_ids.shape[1]:]


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_exported_blip2_loads_fresh_and_greedy_generate_gives_our_tokens(toy, llm, tmp_path):
    backbones, tokenizer, _, images = toy
    model = stage2(toy, llm)
    export_blip2(model, tokenizer, backbones.vision, tmp_path)
    loaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = Blip2Processor.from_pretrained(tmp_path)
    inputs = processor(images=list(images), text=PROMPTS, padding=True, return_tensors="pt")
    assert torch.equal(inputs.pixel_values, pixel_values(images))  # the processor feeds what we feed
    theirs = new_tokens(loaded, loaded.generate(**inputs, **GREEDY), inputs.input_ids)
    ours = generate_ids(model, tokenizer, pixel_values(images), PROMPTS, GenerationParams(max_new_tokens=10))
    assert torch.equal(ours, theirs)
    assert len(set(decode(tokenizer, ours))) > 2  # real, varied text, not one fixed string


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_exported_instructblip_loads_fresh_and_greedy_generate_gives_our_answers(toy, llm, tmp_path):
    backbones, tokenizer, qformer_tokenizer, images = toy
    model = build_instruct_model(stage2(toy, llm), qformer_tokenizer).eval()
    export_instructblip(model, tokenizer, qformer_tokenizer, backbones.vision, tmp_path)
    loaded = InstructBlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = InstructBlipProcessor.from_pretrained(tmp_path)
    assert len(processor.qformer_tokenizer) == len(qformer_tokenizer)
    ours = generate_answers(model, tokenizer, pixel_values(images), PROMPTS, GenerationParams(max_new_tokens=10),
                            qformer_tokenizer=qformer_tokenizer)
    theirs = []
    for image, prompt in zip(images, PROMPTS, strict=True):  # one at a time: see the next test
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        theirs += decode(tokenizer, new_tokens(loaded, loaded.generate(**inputs, **GREEDY), inputs.input_ids))
    assert ours == theirs


def test_instructblip_processor_pads_qformer_text_on_the_llm_tokenizers_side(toy, tmp_path):
    """Why batched InstructBLIP inputs are built here and not by the processor: transformers pads the
    Q-Former's text with the LLM tokenizer's padding side (left), which shifts the Q-Former's absolute
    positions; :func:`encode_qformer_instructions` right-pads. If this starts failing, transformers
    changed and batched processor calls may be safe."""
    backbones, tokenizer, qformer_tokenizer, images = toy
    processor = InstructBlipProcessor(AutoImageProcessor.from_pretrained(backbones.vision), tokenizer,
                                      qformer_tokenizer, num_query_tokens=N)
    inputs = processor(images=list(images[:2]), text=["where is the shape?", "hi"], padding=True, return_tensors="pt")
    assert inputs.qformer_attention_mask[1, 0] == 0


def tiny_vision_config():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                patch_size=16)


def tiny_qformer_config(vocab_size):
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=vocab_size,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def save_random_checkpoint(toy, path, instruct):
    """A tiny random checkpoint written by transformers itself, in the published layout."""
    backbones, tokenizer, qformer_tokenizer, _ = toy
    special = dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if instruct:
        text = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, **special)
        config = InstructBlipConfig(vision_config=tiny_vision_config(),
                                    qformer_config=tiny_qformer_config(len(qformer_tokenizer)),
                                    text_config=text.to_dict(), num_query_tokens=4, image_token_index=4)
        model = InstructBlipForConditionalGeneration(config)
        processor = InstructBlipProcessor(AutoImageProcessor.from_pretrained(backbones.vision), tokenizer,
                                          qformer_tokenizer, num_query_tokens=4)
    else:
        text = OPTConfig(hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                         max_position_embeddings=64, **special)
        config = Blip2Config(vision_config=tiny_vision_config(), qformer_config=tiny_qformer_config(100),
                             text_config=text.to_dict(), num_query_tokens=4, image_token_index=4)
        model = Blip2ForConditionalGeneration(config)
        processor = Blip2Processor(AutoImageProcessor.from_pretrained(backbones.vision), tokenizer, num_query_tokens=4)
    with torch.no_grad():  # transformers zero-initialises the queries: make them tell images apart
        model.query_tokens.normal_(std=1.0)
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return model


@pytest.mark.parametrize("instruct", [False, True], ids=["blip2-opt", "instructblip-t5"])
def test_import_pretrained_loads_the_published_layout(toy, instruct, tmp_path):
    images = toy[3]
    original = save_random_checkpoint(toy, tmp_path, instruct)
    bundle = import_pretrained(tmp_path)
    assert type(bundle.model) is type(original) and bundle.is_instruct == instruct
    assert (bundle.qformer_tokenizer is not None) == instruct
    reference = original.state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in bundle.model.state_dict().items())
    prompts = PROMPTS[:3]
    px = pixel_values(images[:3])
    params = GenerationParams(max_new_tokens=6)
    if instruct:
        ours = generate_answers(bundle.model, bundle.processor(), px, prompts, params)
        theirs = []
        for image, prompt in zip(images[:3], prompts, strict=True):
            inputs = bundle.processor()(images=[image], text=[prompt], return_tensors="pt")
            theirs += decode(bundle.tokenizer, original.generate(**inputs, **GREEDY | dict(max_new_tokens=6)))
        assert ours == theirs
    else:
        ours = generate_ids(bundle.model, bundle.tokenizer, px, prompts, params)
        inputs = bundle.processor()(images=list(images[:3]), text=prompts, padding=True, return_tensors="pt")
        generated = original.generate(**inputs, **GREEDY | dict(max_new_tokens=6))
        assert torch.equal(ours, new_tokens(original, generated, inputs.input_ids))


def test_import_pretrained_refuses_other_models_and_checkpoints_without_image_tokens(toy, tmp_path):
    backbones = toy[0]
    with pytest.raises(ValueError, match="neither"):
        import_pretrained(backbones.opt)
    model = save_random_checkpoint(toy, tmp_path, instruct=False)
    model.config.image_token_index = None
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="image_token_index"):
        import_pretrained(tmp_path)


def test_export_then_import_round_trips_and_checks_the_image_token(toy, tmp_path):
    backbones, tokenizer, _, _ = toy
    model = stage2(toy, "opt")
    bundle = import_pretrained(export_blip2(model, tokenizer, backbones.vision, tmp_path / "out"))
    reference = model.state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in bundle.model.state_dict().items())
    assert bundle.processor().num_query_tokens == N
    model.config.image_token_index = 5
    with pytest.raises(ValueError, match="image_token_index"):
        export_blip2(model, tokenizer, backbones.vision, tmp_path / "bad")
    with pytest.raises(TypeError):
        export_instructblip(model, tokenizer, toy[2], backbones.vision, tmp_path / "bad")


def test_presets_build_toys_and_name_the_published_checkpoints(monkeypatch):
    bundle = presets.load_preset("toy-instruct-t5")
    assert isinstance(bundle, ModelBundle) and bundle.is_instruct
    assert bundle.model.config.num_query_tokens == N and bundle.model.language_model.config.model_type == "t5"
    assert isinstance(presets.load_preset("toy-opt").model, Blip2ForConditionalGeneration)
    assert set(presets.PUBLISHED.values()) == {"Salesforce/blip2-opt-2.7b", "Salesforce/blip2-flan-t5-xl",
                                               "Salesforce/instructblip-flan-t5-xl",
                                               "Salesforce/instructblip-vicuna-7b"}
    asked = []
    monkeypatch.setattr(presets, "import_pretrained", lambda source, dtype: asked.append((source, dtype)))
    presets.load_preset("instructblip-vicuna-7b", dtype=torch.float16)  # the same path as a local export
    assert asked == [("Salesforce/instructblip-vicuna-7b", torch.float16)]
    with pytest.raises(KeyError, match="unknown preset"):
        presets.load_preset("blip3")


# -- checkpoints of the trainable part ----------------------------------------------------------------


def test_save_and_load_trainable_round_trip_in_safetensors(toy, tmp_path):
    wrapper = Blip2Stage2(stage2(toy, "opt"))
    path = tmp_path / "trainable.safetensors"
    names = save_trainable(wrapper, path)
    assert names == sorted(n for n, _ in wrapper.trainable_parameters())
    with safe_open(str(path), "pt") as f:
        assert not any(k.startswith(("vision_model", "language_model")) for k in f.keys())
    torch.manual_seed(1)
    other = Blip2Stage2(build_stage2_model(toy[0].vision, toy[0].opt, STAGE2_QFORMER, N, 4))
    assert not torch.equal(other.model.query_tokens, wrapper.model.query_tokens)
    load_trainable(other, path)
    ours, theirs = wrapper.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    # Strict: a model with more trainable parameters than the file, or a tensor of another shape, is refused.
    other.model.language_model.lm_head.weight.requires_grad_(True)
    with pytest.raises(KeyError, match="missing"):
        load_trainable(other, path)
    wider = Blip2Stage2(build_stage2_model(toy[0].vision, toy[0].opt, STAGE2_QFORMER, N + 1, 4))
    with pytest.raises(ValueError, match="query_tokens"):
        load_trainable(wider, path)

"""The batched runtime over real toy models: the instruction reaches the Q-Former, a batch answers as
its requests do one by one, and exported directories load through the same code as the presets."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BertTokenizer, Blip2ForImageTextRetrieval

from blip2.backbones.build import find_backbones

from blip2.models.export import export_blip2, export_instructblip, export_stage1
from blip2.models.generation import GenerationParams
from blip2.models.stage1 import build_stage1_model
from blip2.models.stage2 import unwrap
from blip2.serving.requests import EmbedRequest, GenerationRequest, MatchRequest
from blip2.serving.runtime import TOY_STAGE1, VisionLanguageRuntime, load_bundle, load_retrieval, load_runtime
from blip2.toyworld.world import all_attributes, render

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = GenerationParams(max_new_tokens=6)


def toy_images(n: int) -> list[Image.Image]:
    attributes = all_attributes()[:: max(1, len(all_attributes()) // n)][:n]
    rng = np.random.default_rng(0)
    return [Image.fromarray(render(a, rng)) for a in attributes]


@pytest.fixture(scope="module")
def instruct_runtime():
    return load_runtime("toy-instruct-opt", TOY_STAGE1)


def test_the_instruction_enters_the_qformer_of_instructblip(instruct_runtime):
    seen = []
    qformer = unwrap(instruct_runtime.bundle.model).qformer
    hook = qformer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    try:
        image = toy_images(1)[0]
        instruct_runtime.generate([GenerationRequest(image, "what colour is the shape?", GREEDY),
                                   GenerationRequest(image, None, GREEDY)])
    finally:
        hook.remove()
    tokenizer = instruct_runtime.bundle.qformer_tokenizer
    texts = tokenizer.batch_decode(seen[0], skip_special_tokens=True)
    assert texts == ["what colour is the shape?", instruct_runtime.settings.caption_instruction]


def test_a_conversation_prompts_the_llm_with_its_turns_and_the_qformer_with_the_last_one(instruct_runtime):
    seen = []
    qformer = unwrap(instruct_runtime.bundle.model).qformer
    hook = qformer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    history = (("system", "answer briefly."), ("user", "what colour is the shape?"), ("assistant", "red"))
    image = toy_images(1)[0]
    try:
        chat, alone = instruct_runtime.generate([GenerationRequest(image, "what shape is it?", GREEDY, history=history),
                                                 GenerationRequest(image, "what shape is it?", GREEDY)])
    finally:
        hook.remove()
    texts = instruct_runtime.bundle.qformer_tokenizer.batch_decode(seen[0], skip_special_tokens=True)
    assert texts == ["what shape is it?", "what shape is it?"]
    prompt = "answer briefly.\nwhat colour is the shape? red\nwhat shape is it?"  # the documented template
    tokens = len(instruct_runtime.bundle.tokenizer(prompt)["input_ids"])
    assert chat.prompt_tokens == tokens + 8 and alone.prompt_tokens < chat.prompt_tokens


def test_a_mixed_batch_answers_as_its_requests_do_alone(instruct_runtime):
    images = toy_images(4)
    requests = [GenerationRequest(images[0], None, GREEDY),
                GenerationRequest(images[1], "what shape is it?", GREEDY),
                GenerationRequest(images[2], "where is the shape?", GenerationParams(max_new_tokens=3, num_beams=2)),
                GenerationRequest(images[3], "what colour is it?", GREEDY)]
    together = instruct_runtime.generate(requests)
    alone = [instruct_runtime.generate([r])[0] for r in requests]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.completion_tokens for r in together] == [r.completion_tokens for r in alone]
    for result, request in zip(together, requests):
        assert 1 <= result.completion_tokens <= request.params.max_new_tokens
        assert result.finish_reason == "stop" or result.completion_tokens == request.params.max_new_tokens
    assert together[1].prompt_tokens > unwrap(instruct_runtime.bundle.model).config.num_query_tokens


def test_sampling_is_reproducible_with_a_seed(instruct_runtime):
    image = toy_images(1)[0]
    params = GenerationParams(max_new_tokens=6, do_sample=True, temperature=1.5)
    runs = [instruct_runtime.generate([GenerationRequest(image, None, params, seed=7)])[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_match_and_embed_agree_with_each_other(instruct_runtime):
    images = toy_images(2)
    matches = instruct_runtime.match([MatchRequest(images[0], "a red circle"), MatchRequest(images[1], "a blue star")])
    embeds = instruct_runtime.embed([EmbedRequest(images[0], "a red circle"), EmbedRequest(None, "a blue star"),
                                     EmbedRequest(images[1], None)])
    assert all(0 <= m.itm_probability <= 1 for m in matches)
    assert embeds[1].image_embedding is None and embeds[2].text_embedding is None
    image_features = np.array(embeds[0].image_embedding)  # (Q, D)
    assert image_features.shape[0] == 8 and np.allclose(np.linalg.norm(image_features, axis=1), 1, atol=1e-5)
    # ITC similarity is the best query's cosine with the text feature.
    assert (image_features @ np.array(embeds[0].text_embedding)).max() == pytest.approx(matches[0].itc_similarity, abs=1e-5)
    assert (np.array(embeds[2].image_embedding) @ np.array(embeds[1].text_embedding)).max() == pytest.approx(
        matches[1].itc_similarity, abs=1e-5)
    instruct_runtime.health_check()


def test_exported_directories_serve_like_the_models_they_came_from(instruct_runtime, tmp_path):
    bundle = instruct_runtime.bundle
    export_instructblip(bundle.model, bundle.tokenizer, bundle.qformer_tokenizer, bundle.image_processor,
                        tmp_path / "instruct")
    export_stage1(instruct_runtime.retrieval.model, tmp_path / "stage1")  # holds no tokenizer: falls back
    loaded = load_runtime(str(tmp_path / "instruct"), str(tmp_path / "stage1"))
    assert loaded.is_instruct
    images = toy_images(2)
    requests = [GenerationRequest(images[0], None, GREEDY), GenerationRequest(images[1], "what size is it?", GREEDY)]
    assert [r.text for r in loaded.generate(requests)] == [r.text for r in instruct_runtime.generate(requests)]
    pairs = [MatchRequest(images[0], "a small red circle on the left")]
    assert loaded.match(pairs)[0].itm_probability == pytest.approx(instruct_runtime.match(pairs)[0].itm_probability, abs=1e-5)


def write_salesforce_layout_retrieval(out: Path) -> Blip2ForImageTextRetrieval:
    """A retrieval directory as Salesforce published ``blip2-itm-vit-g``, written by transformers itself:
    ``Blip2ForImageTextRetrieval.save_pretrained`` (random weights), a BERT WordPiece tokenizer with no
    ``[DEC]`` whose Q-Former has one embedding row more than it has tokens (LAVIS added ``[DEC]`` to
    the model, not to the published tokenizer), the image processor; no side file of ours."""
    backbones = find_backbones()
    toy = AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)
    words = [t for t, _ in sorted(toy.get_vocab().items(), key=lambda item: item[1]) if t != "[DEC]"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    config = copy.deepcopy(build_stage1_model(backbones.vision, backbones.qformer_tokenizer).config)
    config.qformer_config.vocab_size = len(tokenizer) + 1
    torch.manual_seed(1)
    model = Blip2ForImageTextRetrieval(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    AutoImageProcessor.from_pretrained(backbones.vision).save_pretrained(out)
    return model


def test_a_retrieval_directory_in_salesforce_layout_scores_as_transformers_does(instruct_runtime, tmp_path):
    theirs = write_salesforce_layout_retrieval(tmp_path / "itm")
    retrieval = load_retrieval(str(tmp_path / "itm"))
    assert retrieval.model.itg_head is None and "[DEC]" not in retrieval.tokenizer.get_vocab()
    runtime = VisionLanguageRuntime(instruct_runtime.bundle, retrieval)
    images, texts = toy_images(2), ["a large red circle on the left", "a small blue star"]
    got = runtime.match([MatchRequest(i, t) for i, t in zip(images, texts)])
    inputs = retrieval.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = retrieval.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        itm = theirs(pixel_values=pixels, **inputs, use_image_text_matching_head=True).logits_per_image.softmax(-1)
        itc = theirs(pixel_values=pixels, **inputs).logits_per_image.diagonal()
    assert [m.itm_probability for m in got] == pytest.approx(itm[:, 1].tolist(), abs=1e-5)
    assert [m.itc_similarity for m in got] == pytest.approx(itc.tolist(), abs=1e-5)
    embedded = runtime.embed([EmbedRequest(images[0], texts[0])])[0]
    assert len(embedded.image_embedding) == theirs.config.num_query_tokens
    runtime.health_check()
    with pytest.raises(RuntimeError, match="no ITG head"):
        retrieval.model.itg_logits(retrieval.model.encode_images(pixels), inputs["input_ids"], inputs["attention_mask"])


def test_blip2_captions_without_a_prompt_and_answers_with_the_template(tmp_path):
    preset = load_bundle("toy-opt")
    export_blip2(preset.model, preset.tokenizer, preset.image_processor, tmp_path / "blip2")
    runtime = VisionLanguageRuntime(load_bundle(str(tmp_path / "blip2")))
    assert not runtime.is_instruct and runtime.retrieval is None
    image = toy_images(1)[0]
    caption, answer = runtime.generate([GenerationRequest(image, None, GREEDY),
                                        GenerationRequest(image, "what colour is it?", GREEDY)])
    prompt = runtime.bundle.tokenizer("Question: what colour is it? Answer:")["input_ids"]
    assert answer.prompt_tokens == len(prompt) + 8 and caption.prompt_tokens < answer.prompt_tokens
    with pytest.raises(LookupError, match="retrieval"):
        runtime.match([MatchRequest(image, "a")])
    runtime.health_check()


def test_t5_and_bad_sources():
    runtime = load_runtime("toy-instruct-t5")
    result = runtime.generate([GenerationRequest(toy_images(1)[0], "what shape?", GREEDY)])[0]
    assert isinstance(result.text, str) and result.completion_tokens >= 1
    with pytest.raises(ValueError, match="neither a preset"):
        load_bundle("/no/such/model")
    with pytest.raises(ValueError, match="neither"):
        load_retrieval("/no/such/stage1")

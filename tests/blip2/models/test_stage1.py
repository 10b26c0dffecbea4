"""Stage 1: the Q-Former model, its objective, BERT initialisation and transformers interop."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, Blip2ForImageTextRetrieval

from blip2.backbones.vision import pixel_values
from blip2.models.export import STAGE1_EXTRAS, export_stage1, import_stage1
from blip2.models.stage1 import Stage1Objective, build_stage1_model, init_qformer_from_bert
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from blip2.toyworld.world import all_attributes, decode_image




def tiny_model(backbones, **kwargs):
    torch.manual_seed(0)
    return build_stage1_model(backbones.vision, backbones.qformer_tokenizer, num_query_tokens=4,
                              image_text_hidden_size=32, hidden_size=64, num_layers=2, num_heads=4,
                              intermediate_size=128, **kwargs)


def toy_batch(tokenizer, n=8, seed=0):
    records = generate_split(ToyWorldConfig(seed=seed, clean_size=n), "clean")
    images = np.stack([decode_image(r.image) for r in records])
    text = tokenizer([r.alt_text for r in records], padding="max_length", max_length=20, return_tensors="pt")
    ids = torch.tensor([all_attributes().index(r.attributes) for r in records])  # same attributes: positives
    return pixel_values(images), text.input_ids, text.attention_mask, ids


def test_objective_trains_only_the_qformer(backbones, tokenizer):
    model = tiny_model(backbones).train()
    assert not model.vision_model.training  # frozen modules stay in eval mode under .train()
    frozen = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    trainable = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    assert trainable and not any(k.startswith("vision_model.") for k in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pixels, input_ids, attention_mask, ids = toy_batch(tokenizer)
    out = Stage1Objective()(model, pixels, input_ids, attention_mask, ids, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, out.itc_loss + out.itm_loss + out.lm_loss)
    out.loss.backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    optimizer.step()
    assert all(torch.equal(v, model.vision_model.state_dict()[k]) for k, v in frozen.items())
    for name in ("query_tokens", "qformer.encoder.layer.0.crossattention.attention.query.weight", "temp",
                 "itm_head.weight", "vision_projection.weight", "itg_head.dense.weight"):
        assert not torch.equal(trainable[name], dict(model.named_parameters())[name]), name


def test_itm_weight_and_diagnostics(backbones, tokenizer):
    model = tiny_model(backbones).eval()
    pixels, input_ids, attention_mask, ids = toy_batch(tokenizer)
    attributes = torch.tensor([[0, 0, 0, 0]] * 4 + [[1, 1, 1, 1]] * 4)  # pairs 0-3 and 4-7 differ in all four
    objective = Stage1Objective(itm_weight=3.0, diagnostics=True)
    out = objective(model, pixels, input_ids, attention_mask, ids, torch.Generator().manual_seed(0),
                    attributes=attributes)
    assert torch.allclose(out.loss, out.itc_loss + 3 * out.itm_loss + out.lm_loss)
    d = out.diagnostics
    assert {"itm_acc_positive", "itm_acc_hard", "itm_acc_random", "itm_negatives_available"} <= set(d)
    assert all(0 <= float(d[k]) <= 1 for k in d if k != "itm_negative_attributes_differing")
    # Within a half, captions state the same attributes: a negative differs in 0 or 4 attributes.
    differing = float(d["itm_negative_attributes_differing"])
    assert 0 <= differing <= 4 and all(not v.requires_grad for v in d.values())
    assert not Stage1Objective()(model, pixels, input_ids, attention_mask, ids).diagnostics


def test_loss_weights_ablate_objectives(backbones, tokenizer):
    """``loss.itc_weight`` / ``loss.itg_weight`` (1 by default; 0 ablates one, BLIP-2's ITG ablation): the
    ablated loss is still computed (and logged) but leaves the summed loss."""
    from blip2.training.config import Stage1LossConfig

    model = tiny_model(backbones).eval()
    pixels, input_ids, attention_mask, ids = toy_batch(tokenizer)
    out = Stage1Objective(itc_weight=0.5, itg_weight=0.0)(model, pixels, input_ids, attention_mask, ids,
                                                         torch.Generator().manual_seed(0))
    assert out.lm_loss > 0 and torch.allclose(out.loss, 0.5 * out.itc_loss + out.itm_loss)
    assert (Stage1LossConfig().itc_weight, Stage1LossConfig().itg_weight) == (1.0, 1.0)
    with pytest.raises(ValueError, match="itc_weight and itg_weight must be >= 0"):
        Stage1LossConfig(itg_weight=-1)


def test_diagnostics_do_not_change_what_training_samples(backbones, tokenizer):
    """The diagnostics' extra ITM pass draws its random negatives from a generator of its own: with them
    on or off, the same seed samples the same hard negatives, so the losses (and the trained model) agree."""
    pixels, input_ids, attention_mask, ids = toy_batch(tokenizer, n=16, seed=1)
    losses = {}
    for diagnostics in (False, True):
        model = tiny_model(backbones).eval()
        objective, generator = Stage1Objective(diagnostics=diagnostics), torch.Generator().manual_seed(0)
        losses[diagnostics] = [objective(model, pixels, input_ids, attention_mask, ids, generator).itm_loss.item()
                               for _ in range(3)]
    assert losses[True] == losses[False]


def test_a_few_steps_reduce_every_loss(backbones, tokenizer):
    model = tiny_model(backbones).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    objective = Stage1Objective()
    batch = toy_batch(tokenizer, n=16, seed=1)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(25):
        out = objective(model, *batch, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append([out.itc_loss.item(), out.itm_loss.item(), out.lm_loss.item()])
    first, last = np.array(history[:3]).mean(0), np.array(history[-3:]).mean(0)
    assert (last < first).all(), (first, last)
    assert last[2] < 0.6 * first[2]  # ITG memorises a fixed batch quickly


def test_export_loads_into_transformers_and_scores_identically(backbones, tokenizer, tmp_path):
    model = tiny_model(backbones).eval()
    pixels, input_ids, attention_mask, _ = toy_batch(tokenizer, n=4)
    export_stage1(model, tmp_path / "stage1")
    assert (tmp_path / "stage1" / STAGE1_EXTRAS).exists()
    theirs = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "stage1").eval()
    with torch.no_grad():
        image_embeds = model.encode_images(pixels)
        ours_itc = model.itc_similarity(model.image_features(image_embeds), model.text_features(input_ids, attention_mask))
        ours_itm = model.itm_logits(image_embeds, input_ids, attention_mask)
        their_itc = theirs(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask).logits_per_image
        their_itm = theirs(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask,
                           use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(ours_itc, their_itc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_itm, their_itm, rtol=1e-5, atol=1e-5)

    again = import_stage1(tmp_path / "stage1").eval()  # the ITG head and temperature come back too
    assert again.dec_token_id == model.dec_token_id
    with torch.no_grad():
        torch.testing.assert_close(again.itg_logits(image_embeds, input_ids, attention_mask)[0],
                                   model.itg_logits(image_embeds, input_ids, attention_mask)[0])
    assert again.temp.item() == model.temp.item()


def test_import_of_a_directory_saved_by_transformers_itself(backbones, tokenizer, tmp_path):
    source = tiny_model(backbones)
    theirs = Blip2ForImageTextRetrieval(source.config).eval()  # random weights, Salesforce's layout
    theirs.save_pretrained(tmp_path / "hub")
    scorer = import_stage1(tmp_path / "hub")  # ITC and ITM as published; no ITG head, no [DEC] needed
    assert scorer.itg_head is None and scorer.dec_token_id is None
    ours = import_stage1(tmp_path / "hub", dec_token_id=source.dec_token_id).eval()  # a fresh ITG head to train
    assert ours.itg_head is not None
    pixels, input_ids, attention_mask, _ = toy_batch(tokenizer, n=3)
    with torch.no_grad():
        expected = theirs(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask,
                          use_image_text_matching_head=True).logits_per_image
        got = ours.itm_logits(ours.encode_images(pixels), input_ids, attention_mask)
        scored = scorer.eval().itm_logits(scorer.encode_images(pixels), input_ids, attention_mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored, expected, rtol=1e-5, atol=1e-5)


def test_bert_initialisation_copies_self_attention_and_ffn_not_cross_attention(backbones, tokenizer, tmp_path):
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    model = tiny_model(backbones, bert_path=tmp_path / "bert")
    ours, source = model.state_dict(), bert.state_dict()
    layer = "qformer.encoder.layer.1."
    assert torch.equal(ours[layer + "attention.attention.query.weight"], source["encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(ours[layer + "intermediate.dense.weight"], source["encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(ours[layer + "intermediate_query.dense.weight"], source["encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(ours["embeddings.word_embeddings.weight"], source["embeddings.word_embeddings.weight"])
    assert torch.equal(ours["qformer.layernorm.weight"], source["embeddings.LayerNorm.weight"])
    copied = init_qformer_from_bert(model, tmp_path / "bert")
    assert not any("crossattention" in name for name in copied)
    assert len(copied) > 30


def test_stage2_starts_from_the_stage1_qformer(backbones, tokenizer):
    """The stage-1 checkpoint's queries and Q-Former carry over: same query outputs for the same image."""
    from blip2.models.qformer import build_qformer_config
    from blip2.models.stage2 import build_stage2_model

    stage1 = tiny_model(backbones).eval()
    lm_tokenizer = AutoTokenizer.from_pretrained(backbones.opt)
    qformer_config = build_qformer_config(128, len(tokenizer), hidden_size=64, num_layers=2, num_heads=4,
                                          intermediate_size=128, use_qformer_text_input=False)
    stage2 = build_stage2_model(backbones.vision, backbones.opt, qformer_config, 4,
                                lm_tokenizer.convert_tokens_to_ids("<image>"),
                                stage1_state_dict=stage1.state_dict()).eval()
    pixels, *_ = toy_batch(tokenizer, n=2)
    with torch.no_grad():
        expected = stage1.qformer_pass(stage1.encode_images(pixels), None, None, "itc").query_output
        got = stage2.get_image_features(pixels).qformer_outputs.last_hidden_state
    torch.testing.assert_close(got, expected)


def test_half_precision_image_encoder_feeds_the_qformer_fp32(backbones, tokenizer):
    """The GPU recipe, checked on CPU with bf16: frozen encoder in half precision, its output norm and
    everything trainable in fp32."""
    from blip2.models.stage2 import cast_backbones

    model = tiny_model(backbones)
    cast_backbones(model, torch.bfloat16)
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.vision_model.post_layernorm.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    pixels, input_ids, attention_mask, ids = toy_batch(tokenizer, n=4)
    assert model.encode_images(pixels.bfloat16()).dtype == torch.float32
    out = Stage1Objective()(model, pixels.bfloat16(), input_ids, attention_mask, ids)
    assert torch.isfinite(out.loss)

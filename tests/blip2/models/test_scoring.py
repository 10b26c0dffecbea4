import torch

from blip2.models.scoring import itc_similarity, itm_probability, multimodal_embeddings, retrieve
from tests.blip2.models.test_stage1 import tiny_model, toy_batch


def test_scores_and_retrieval(backbones, tokenizer):
    model = tiny_model(backbones).eval()
    pixels, input_ids, attention_mask, _ = toy_batch(tokenizer, n=6)
    image_embeds = model.encode_images(pixels)
    similarity = itc_similarity(model, image_embeds, input_ids, attention_mask)
    assert similarity.shape == (6, 6) and similarity.abs().max() <= 1 + 1e-5  # cosine similarities

    probability = itm_probability(model, image_embeds, input_ids, attention_mask, batch_size=4)
    logits = model.itm_logits(image_embeds, input_ids, attention_mask)
    torch.testing.assert_close(probability, logits.softmax(-1)[:, 1])
    assert multimodal_embeddings(model, image_embeds, input_ids, attention_mask).shape == (6, 4, 64)

    # k=1: the ITC ranking untouched
    plain = retrieve(model, image_embeds, input_ids, attention_mask, k=1)
    assert torch.equal(plain.image_to_text, similarity.argsort(dim=1, descending=True))
    assert torch.equal(plain.text_to_image, similarity.t().argsort(dim=1, descending=True))
    # k=all: image 0's best text is the one with the highest ITM logit + ITC similarity
    full = retrieve(model, image_embeds, input_ids, attention_mask, k=6)
    for ranking in (full.image_to_text, full.text_to_image):
        assert all(sorted(row.tolist()) == list(range(6)) for row in ranking)  # permutations
    with torch.no_grad():
        pair_logits = model.itm_logits(image_embeds[0].expand(6, -1, -1), input_ids, attention_mask)
    combined = pair_logits[:, 1] - pair_logits[:, 0] + similarity[0]
    assert full.image_to_text[0, 0] == combined.argmax()


def test_batched_rerank_is_retrieve_and_blip2_evaluates_the_same_rerank(backbones, tokenizer):
    """``blip2 evaluate`` re-ranks from a table of ITM logits (they come back from Ray Data actors):
    its rankings equal the in-process re-rank for every ``itc_scale`` (BLIP-2's sum 1, ITM alone 0)."""
    from blip2.datasets.tasks import itm_candidates, rerank
    from blip2.models.scoring import rerank_with_itm

    model = tiny_model(backbones).eval()
    pixels, input_ids, attention_mask, _ = toy_batch(tokenizer, n=8)
    image_embeds = model.encode_images(pixels)
    similarity = itc_similarity(model, image_embeds, input_ids, attention_mask)
    for k in (1, 3, 8):
        expected = retrieve(model, image_embeds, input_ids, attention_mask, k=k)
        got = rerank_with_itm(model, image_embeds, input_ids, attention_mask, similarity, k, batch_size=3)
        assert torch.equal(got.text_to_image, expected.text_to_image)
        assert torch.equal(got.image_to_text, expected.image_to_text)
        with torch.no_grad():
            logits = {}
            for image, texts in enumerate(itm_candidates(similarity, k)):
                pair = model.itm_logits(image_embeds[image].expand(len(texts), -1, -1), input_ids[texts],
                                        attention_mask[texts])
                logits.update({(image, t): float(v) for t, v in zip(texts, pair[:, 1] - pair[:, 0])})
        for scale in (1.0, 0.0, 0.5):
            in_process = rerank_with_itm(model, image_embeds, input_ids, attention_mask, similarity, k, itc_scale=scale)
            text_to_image, image_to_text = rerank(similarity, logits, k, itc_scale=scale)
            assert torch.equal(text_to_image, in_process.text_to_image), (k, scale)
            assert torch.equal(image_to_text, in_process.image_to_text), (k, scale)

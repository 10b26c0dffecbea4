"""``SetPredictor``: blip2 evaluate's per-actor model (captions, answers, embeddings, ITM logits)."""

import torch

from blip2.datasets.predict import SetPredictor
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from blip2.images import load_image


def test_itm_logits_of_many_images_are_each_image_scored_alone():
    """Images encoded together and pairs batched across images (and across the pair batches' edges) give
    each image's logits, in its texts' order, as scoring it alone through the model does."""
    torch.manual_seed(0)
    predictor = SetPredictor("toy-stage1", retrieval=True)
    records = generate_split(ToyWorldConfig(val_size=3), "val")[:3]
    images = [load_image(r.image) for r in records]
    texts = [[records[0].alt_text, "a red circle", "a small blue square on the left of a big picture"],
             [],  # an image with no candidates gets none back
             [records[2].alt_text, records[0].alt_text]]
    got = predictor.itm_logits(images, texts, batch_size=2)
    assert [len(values) for values in got] == [3, 0, 2]
    model = predictor.retrieval.model
    for image, candidates, values in zip(images, texts, got):
        for text, value in zip(candidates, values):
            ids, mask = predictor._text_inputs([text])
            pair = model.itm_logits(predictor._image_embeds([image]), ids, mask)
            assert abs((pair[0, 1] - pair[0, 0]).item() - value) < 1e-4

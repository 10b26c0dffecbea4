import numpy as np
from transformers import AutoTokenizer

from blip2.backbones.build import find_backbones
from blip2.training.data import match_ids, stage1_batch


def test_match_ids_join_phrasings_of_the_same_attributes_only():
    ids = match_ids(["a small red circle on the left", "on the left there is a small red circle",
                     "a small red circle on the right", "IMG_0412.JPG", "img_0412.jpg ", "a red circle"])
    assert ids[0] == ids[1]  # two templates, same four attributes
    assert ids[0] != ids[2]  # one attribute differs
    assert ids[3] == ids[4]  # same text up to case and spaces
    assert len({int(i) for i in ids[[0, 2, 3, 5]]}) == 4


def test_stage1_batch_shapes():
    tokenizer = AutoTokenizer.from_pretrained(find_backbones().qformer_tokenizer)
    images = np.zeros((3, 64, 64, 3), dtype=np.uint8)
    batch = stage1_batch(images, ["a red circle", "a large blue star at the top", ""], tokenizer, max_length=12)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 12)
    assert batch["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    assert batch["attention_mask"][2].sum() == 2  # [CLS] [SEP] of the empty caption

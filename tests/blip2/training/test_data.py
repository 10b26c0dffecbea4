from collections import Counter

import numpy as np
from transformers import AutoTokenizer

from blip2.backbones.build import find_backbones
from blip2.toyworld.corpus import ToyWorldConfig, generate_split
from blip2.training.data import match_ids, stage1_batch
from blip2.training.records import (
    batch_images,
    caption_choices,
    kept_records,
    reason_counts,
    skip_counts,
    training_records,
    validated_records,
)
from tests import badcorpus


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


def test_bad_records_are_skipped_and_counted_by_reason_in_every_layout():
    good = generate_split(ToyWorldConfig(seed=3, clean_size=4), "clean")[0]
    bad = badcorpus.bad_records(good.image, good.alt_text)

    def column(values, missing):
        array = np.empty(len(values), dtype=object)
        array[:] = [missing if v is None else v for v in values]
        return array

    layouts = {  # Ray's WebDataset reader leaves NaN for a missing member; Parquet holds None
        "webdataset": {"jpg": column([r.image for r in bad], float("nan")),
                       "txt": column([r.text for r in bad], float("nan"))},
        "parquet": {"image": column([r.image for r in bad], None), "text": column([r.text for r in bad], None)},
    }
    expected = Counter("kept" if r.expect == "ok" else r.expect for r in bad)
    for name, batch in layouts.items():
        counts = skip_counts(batch)
        assert dict(zip(counts["reason"], counts["count"].tolist())) == expected, name
        kept = training_records(batch)
        assert len(kept["image"]) == expected["kept"]
        assert all("\x00" not in text for texts in caption_choices(kept) for text in texts)  # NUL removed
        assert batch_images(kept, 32).shape == (expected["kept"], 32, 32, 3)  # CMYK, 16-bit, RGBA: RGB now
        resized = training_records(batch, image_size=32)["image"]  # decoded and resized once, in Ray Data
        assert resized.dtype == np.uint8 and np.array_equal(resized, batch_images(kept, 32))
        assert batch_images({"image": resized}, 32) is resized  # nothing left for the training step to do
        # one pass instead of two: every record validated and decoded once, counted from its reason, then kept
        validated = validated_records(batch, image_size=32)
        assert validated["image"].shape == (len(bad), 32, 32, 3) and len(validated["reason"]) == len(bad)
        tally = reason_counts(validated)
        assert dict(zip(tally["reason"], tally["count"].tolist())) == expected, name
        one_pass = kept_records(validated)
        assert set(one_pass) == {"image", "captions_json"} and np.array_equal(one_pass["image"], resized)
        assert list(one_pass["captions_json"]) == list(kept["captions_json"])
    empty = training_records({"image": column([None], None), "text": column(["a caption"], None)}, image_size=32)
    assert empty["image"].shape == (0, 32, 32, 3)  # Ray Data unifies it with the other blocks' tensors
    assert kept_records(validated_records({"image": column([None], None), "text": column(["a"], None)}, 32)
                        )["image"].shape == (0, 32, 32, 3)

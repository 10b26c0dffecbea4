import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from blip2.toyworld.corpus import (
    NOISE_KINDS,
    NOVEL_PAIRS,
    SPLITS,
    ToyWorldConfig,
    generate_split,
    iter_webdataset,
    labels_agree,
    split_attributes,
    write_toyworld,
)
from blip2.toyworld.text import caption_matches, parse_attributes
from blip2.toyworld.world import COLOURS, SHAPES, decode_image

from tests.conftest import SMALL_WORLD


def test_same_config_gives_byte_identical_shards(tmp_path, small_world):
    root, _ = small_world
    write_toyworld(SMALL_WORLD, tmp_path)
    for split in SPLITS:
        for ours, theirs in zip(sorted((tmp_path / "webdataset" / split).iterdir()),
                                sorted((root / "webdataset" / split).iterdir()), strict=True):
            assert ours.read_bytes() == theirs.read_bytes()


def test_another_seed_gives_another_corpus():
    a = generate_split(ToyWorldConfig(seed=0, test_size=20), "test")
    b = generate_split(ToyWorldConfig(seed=1, test_size=20), "test")
    assert [r.image for r in a] != [r.image for r in b]


def test_web_noise_rate_and_kinds_within_tolerance():
    records = generate_split(ToyWorldConfig(web_size=3000), "web")
    kinds = Counter(r.noise for r in records)
    assert abs(sum(kinds[k] for k in NOISE_KINDS) / len(records) - 0.35) < 0.01
    for kind in NOISE_KINDS:
        assert abs(kinds[kind] / len(records) - 0.35 / 3) < 0.01


def test_ground_truth_agrees_with_the_text_of_every_alt_text():
    """alt_text_matches is True exactly when the alt-text states the image's attributes."""
    for record in generate_split(ToyWorldConfig(web_size=1500), "web"):
        assert record.alt_text_matches == caption_matches(record.alt_text, record.attributes), record
        if record.noise == "attribute":  # one attribute changed, the other three still right
            stated = parse_attributes(record.alt_text)
            assert sum(stated[n] == v for n, v in record.attributes.as_dict().items()) == 3
        if record.noise == "junk":
            assert parse_attributes(record.alt_text) == {}


def test_clean_and_held_out_splits_are_all_correct():
    for split in ("clean", "val", "test", "novel"):
        records = generate_split(ToyWorldConfig(), split)
        assert all(r.alt_text_matches and caption_matches(r.alt_text, r.attributes) for r in records)


def test_novel_pairs_never_occur_in_training_splits():
    assert {c for c, _ in NOVEL_PAIRS} == set(COLOURS) and {s for _, s in NOVEL_PAIRS} == set(SHAPES)
    novel = set(NOVEL_PAIRS)
    config = ToyWorldConfig()
    for split in SPLITS:
        pairs = {(r.attributes.colour, r.attributes.shape) for r in generate_split(config, split)}
        if split == "novel":
            assert pairs <= novel and len(pairs) == len(novel)
        else:
            assert not pairs & novel
            # every colour and every shape is still seen in training, just not in these combinations
            assert {c for c, _ in pairs} == set(COLOURS) and {s for _, s in pairs} == set(SHAPES)
    assert len(split_attributes("web")) + len(split_attributes("novel")) == 6 * 7 * 2 * 5


def test_webdataset_layout_and_pixel_truth(small_world):
    root, summary = small_world
    shards = sorted((root / "webdataset" / "web").glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    records = list(iter_webdataset(shards))
    assert len(records) == summary.counts["web"] == 300
    for record in records:
        assert set(record) == {"key", "jpg", "txt", "json"}
        meta = record["json"]
        assert meta["key"] == record["key"] and meta["caption"] == record["txt"] and meta["split"] == "web"
        assert labels_agree(decode_image(record["jpg"]), meta)
    assert sum(not r["json"]["alt_text_matches"] for r in records) == round(0.35 * 300)


def test_parquet_shards_hold_image_bytes_and_columns(small_world):
    root, _ = small_world
    table = pq.read_table(root / "parquet" / "clean")
    assert table.num_rows == SMALL_WORLD.clean_size
    assert {"key", "image", "text", "shape", "colour", "size", "position", "alt_text_matches", "noise"} \
        <= set(table.column_names)
    row = table.slice(0, 1).to_pylist()[0]
    assert decode_image(row["image"]).shape == (64, 64, 3)


def test_manifest_describes_what_was_written(small_world):
    root, summary = small_world
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"] == {s: SMALL_WORLD.split_size(s) for s in SPLITS}
    for split in SPLITS:
        assert all((root / f).exists() for f in manifest["files"][split])


@pytest.mark.parametrize("bad", [dict(image_size=60), dict(web_noise_rate=1.5), dict(test_size=-1),
                                 dict(shard_size=0)])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        ToyWorldConfig(**bad)

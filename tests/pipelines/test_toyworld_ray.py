"""The toy world's shards read back through Ray Data, as every later pipeline will read them."""

import pytest

from blip2.toyworld.corpus import SPLITS, labels_agree
from pipelines.toyworld import audit_corpus

from tests.conftest import SMALL_WORLD

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_read_webdataset_decodes_every_record(small_world, ray_local):
    root, summary = small_world
    ds = ray_local.data.read_webdataset(str(root / "webdataset" / "web"))
    rows = ds.take_all()
    assert len(rows) == summary.counts["web"]
    assert len({r["__key__"] for r in rows}) == len(rows)
    row = rows[0]
    assert row["jpg"].shape == (64, 64, 3)  # decoded by Ray Data
    assert row["json"]["caption"] == row["txt"]
    assert labels_agree(row["jpg"], row["json"])


def test_read_parquet_sees_the_same_corpus(small_world, ray_local):
    root, summary = small_world
    ds = ray_local.data.read_parquet(str(root / "parquet" / "web"))
    assert ds.count() == summary.counts["web"]
    wrong = sum(v for k, v in summary.noise.items() if k != "none")
    assert sum(not r["alt_text_matches"] for r in ds.take_all()) == wrong


def test_audit_counts_every_split_and_confirms_labels(small_world, ray_local):
    root, _ = small_world
    stats = audit_corpus(root)
    assert stats["per_split"] == {s: SMALL_WORLD.split_size(s) for s in SPLITS}
    assert stats["pixels_match_labels"] == 1.0
    assert abs(sum(v for k, v in stats["web_noise"].items() if k != "none") - 0.35) < 0.01

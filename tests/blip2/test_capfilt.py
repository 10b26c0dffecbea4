"""CapFilt library (no Ray): readers, record validation, selection, outputs, accounting, report, models."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests import badcorpus
from blip2.capfilt.config import CaptionerConfig, FilterConfig, InputConfig, ValidationConfig
from blip2.capfilt.models import Captioner, CaptionFilter, decode_list, to_pixel_values
from blip2.capfilt.outputs import KEPT_SCHEMA, ShardCollector, completed_shards, prepare_output
from blip2.capfilt.readers import list_shards, read_shard
from blip2.capfilt.records import END, check_caption, decode_record, shard_batches
from blip2.capfilt.report import AccountingError, build_report, check_accounting, filter_quality
from blip2.capfilt.select import candidates, select_captions
from blip2.models.generation import generate_captions
from blip2.toyworld.corpus import iter_webdataset


@pytest.fixture(scope="module")
def good(small_world):
    root, _ = small_world
    record = next(iter_webdataset(sorted((root / "webdataset" / "val").glob("*.tar"))))
    return record["jpg"], record["txt"]


@pytest.fixture(scope="module")
def records(good):
    return badcorpus.bad_records(*good)


def _decoded(records, fmt, tmp_path, bad_caption="drop"):
    if fmt == "webdataset":
        config = InputConfig(format=fmt, path=str(badcorpus.write_webdataset(records, tmp_path / "bad.tar")))
    elif fmt == "parquet":
        config = InputConfig(format=fmt, path=str(badcorpus.write_parquet(records, tmp_path / "bad.parquet")))
    else:
        path = badcorpus.write_coco_corpus(records, tmp_path / "coco")
        config = InputConfig(format=fmt, path=str(path), images=str(tmp_path / "coco" / "images"))
    (shard,) = list_shards(config)
    rows = []
    for batch in shard_batches(shard, config, ValidationConfig(bad_caption=bad_caption), 32, True, 5):
        rows += [dict(zip(batch, values)) for values in zip(*batch.values())]
    return rows


def _outcome(row):
    return row["reason"] if row["status"] == "rejected" else (row["caption_issue"] or "ok")


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "coco"])
def test_every_bad_kind_gets_its_reason_in_every_format(records, fmt, tmp_path):
    rows = _decoded(records, fmt, tmp_path)
    assert rows[-1]["status"] == END and rows[-1]["index"] == len(rows) - 1
    expected = {r.key: r.expect for r in records}
    if fmt == "coco":  # JSON carries no undecodable bytes; a record without an image has no file
        expected = {k: v for k, v in expected.items() if k != "non_utf8_caption"}
        expected["missing_image"] = "missing_file"
    else:
        assert [r["key"] for r in rows[:-1]] == list(expected)
    assert dict(zip(expected, map(_outcome, rows[:-1]), strict=True)) == expected
    for row in rows[:-1]:
        if row["status"] == "ok":
            assert row["pixels"].shape == (32, 32, 3) and row["pixels"].dtype == np.uint8 and row["image"]
        else:
            assert row["detail"] and not row["image"]


def test_normalised_images_have_their_colours(records, tmp_path):
    rows = {r["key"]: r for r in _decoded(records, "webdataset", tmp_path)}
    assert rows["cmyk"]["pixels"][16, 16, 0] > 200 and rows["cmyk"]["pixels"][16, 16, 1] < 80
    assert abs(int(rows["sixteen_bit"]["pixels"][16, 16, 0]) - round(40_000 / 257)) <= 1
    assert rows["rgba"]["pixels"][0, 0].tolist() == [255, 255, 255]  # transparent corner -> white
    # re-encoded (portable PNG) for kept/, since CMYK or 16-bit bytes would trip other decoders
    assert rows["cmyk"]["image"][:4] == b"\x89PNG" and rows["good"]["image"][:2] == b"\xff\xd8"


def test_bad_caption_reject_policy(records, tmp_path):
    rows = {r["key"]: r for r in _decoded(records, "webdataset", tmp_path, bad_caption="reject")}
    for kind in ("empty_caption", "overlong_caption", "non_utf8_caption", "missing_caption"):
        assert rows[kind]["status"] == "rejected" and rows[kind]["reason"] == kind


def test_check_caption():
    assert check_caption(b"a  red\tcircle\n", 100) == ("a red circle", None)
    assert check_caption("x\x00y", 100) == ("x y", None)
    assert check_caption(None, 100) == (None, "missing_caption")
    assert check_caption("", 100) == (None, "empty_caption")
    assert check_caption(b"\xff", 100) == (None, "non_utf8_caption")
    assert check_caption("bad \ufffd text", 100) == (None, "non_utf8_caption")
    assert check_caption("a" * 101, 100) == (None, "overlong_caption")


def test_unreadable_shard_and_duplicate_keys(tmp_path, good):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar file at all" * 20)
    (record,) = list(read_shard(list_shards(InputConfig(path=str(broken)))[0], InputConfig()))
    assert record.error == "unreadable_shard"
    path = tmp_path / "dup.parquet"
    badcorpus.write_parquet([badcorpus.BadRecord("same", good[0], b"x", "ok")] * 2, path)
    (shard,) = list_shards(InputConfig(format="parquet", path=str(path)))
    (batch,) = list(shard_batches(shard, InputConfig(format="parquet"), ValidationConfig(), 16, False, 10))
    assert list(batch["status"]) == ["ok", "rejected", END] and batch["reason"][1] == "duplicate_key"


def test_parquet_paths_and_missing_key(tmp_path, good):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(good[0])
    import pyarrow as pa
    pq.write_table(pa.table({"image_path": ["img/a.jpg", "img/gone.jpg"], "text": ["a", "b"]}), tmp_path / "p.parquet")
    config = InputConfig(format="parquet", path=str(tmp_path / "p.parquet"))
    rows = [decode_record(r, "p", ValidationConfig(), 16) for r in read_shard(list_shards(config)[0], config)]
    assert [r.status for r in rows] == ["ok", "rejected"] and rows[1].reason == "missing_file"
    assert rows[0].key == "p-000000" and rows[0].image_ref.endswith("img/a.jpg")


def test_candidates_and_selection():
    texts, sources = candidates("A red circle", ["a red  circle", "a blue square", "", "a blue square"])
    assert texts == ["A red circle", "a blue square"] and sources == ["web", "synthetic"]
    chosen = select_captions(["w", "s1", "s2", "s3"], ["web", "synthetic", "synthetic", "synthetic"],
                             [0.6, 0.9, 0.6, 0.2], threshold=0.5, top_n=2)
    assert chosen.captions == ["s1", "w"] and chosen.sources == ["synthetic", "web"]  # tie: web first
    assert chosen.best_score == pytest.approx(0.9)
    nothing = select_captions(["w"], ["web"], [0.3], 0.5, 2)
    assert not nothing.kept and nothing.best_score == pytest.approx(0.3)


def _final_rows(n, shard="s", status="kept"):
    rows = []
    for i in range(n):
        rows.append({"shard": shard, "index": i, "key": f"k{i}", "image_ref": f"ref{i}", "status": status,
                     "reason": "truncated" if status == "rejected" else "", "detail": "", "web_text": "w",
                     "caption_issue": "", "image": b"x", "ground_truth": True, "synthetic": ["s"],
                     "web_score": 0.9, "synthetic_scores": [0.8], "captions": ["w", "s"],
                     "caption_sources": ["web", "synthetic"], "caption_scores": [0.9, 0.8], "best_score": 0.9})
    return rows


def _batch(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_collector_out_of_order_duplicates_and_markers(tmp_path):
    prepare_output(tmp_path)
    rows = _final_rows(5)
    end = {**rows[0], "status": END, "index": 5, "key": ""}
    collector = ShardCollector(tmp_path, "bytes")
    assert collector.add(_batch([end, rows[3]])) == []  # the END row may come first
    assert collector.add(_batch([rows[0], rows[3], rows[1]])) == []  # a repeated row is dropped
    (marker,) = collector.add(_batch([rows[2], rows[4]]))
    assert marker == completed_shards(tmp_path)["s"]
    assert (marker["input"], marker["kept"], marker["duplicates_dropped"]) == (5, 5, 1)
    table = pq.read_table(tmp_path / "kept" / "s.parquet")
    assert table.schema == KEPT_SCHEMA and table.column("key").to_pylist() == [f"k{i}" for i in range(5)]
    assert check_accounting(tmp_path, ["s"]) == {"input": 5, "kept": 5, "filtered": 0, "rejected": 0}


def test_accounting_catches_a_lost_record_and_a_missing_shard(tmp_path):
    prepare_output(tmp_path)
    collector = ShardCollector(tmp_path, "reference")
    rows = _final_rows(3)
    collector.add(_batch(rows + [{**rows[0], "status": END, "index": 3}]))
    assert pq.read_table(tmp_path / "kept" / "s.parquet").column("image").to_pylist() == [None] * 3
    with pytest.raises(AccountingError, match="not finished"):
        check_accounting(tmp_path, ["s", "other"])
    marker = tmp_path / "_done" / "s.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "input": 4, "filtered": 1}))
    with pytest.raises(AccountingError, match="files hold"):
        check_accounting(tmp_path, ["s"])


def test_report_and_filter_quality(tmp_path):
    prepare_output(tmp_path)
    rows = _final_rows(4) + [{**r, "index": 4 + i, "key": f"r{i}", "status": "rejected", "reason": "truncated"}
                             for i, r in enumerate(_final_rows(2))]
    rows[1].update(web_score=0.1, ground_truth=False)  # flagged, really wrong
    rows[2].update(web_score=0.2, ground_truth=True)  # flagged, but right
    rows[3].update(web_score=None, ground_truth=False, caption_issue="empty_caption")  # dropped: flagged
    collector = ShardCollector(tmp_path, "bytes")
    collector.add(_batch(rows + [{**rows[0], "status": END, "index": 6}]))
    report = build_report(tmp_path, ["s"], threshold=0.5)
    assert report["invariant_holds"] and report["counts"] == {"input": 6, "kept": 4, "filtered": 0, "rejected": 2}
    assert report["rejected_by_reason"] == {"truncated": 2} and report["web_caption_issues"] == {"empty_caption": 1}
    quality = report["filter_quality"]
    assert (quality["tp"], quality["fp"], quality["fn"], quality["tn"]) == (2, 1, 0, 1)
    assert (tmp_path / "scores.png").stat().st_size > 1000 and (tmp_path / "report.json").exists()
    assert filter_quality([0.9], [None], 0.5) is None


def test_captioner_and_filter_on_a_batch(records, tmp_path, one_thread):
    rows = _decoded(records[:3], "webdataset", tmp_path)
    batch = {k: np.asarray([r[k] for r in rows], dtype=object) if k != "pixels" else np.stack([r[k] for r in rows])
             for k in rows[0]}
    captioned = Captioner(CaptionerConfig(num_captions=2, max_new_tokens=6, min_new_tokens=2))(batch)
    ok = [s == "ok" for s in batch["status"]]
    assert [len(decode_list(s)) > 0 for s in captioned["synthetic"]] == ok  # only valid rows are captioned
    again = Captioner(CaptionerConfig(num_captions=2, max_new_tokens=6, min_new_tokens=2))(batch)
    assert list(again["synthetic"]) == list(captioned["synthetic"])  # seeded by key
    out = CaptionFilter(FilterConfig(threshold=0.0, top_n=2))(captioned)
    assert "pixels" not in out
    assert list(out["status"]) == ["kept", "rejected", "rejected", END][: len(rows)]
    assert 0 < out["web_score"][0] < 1 and np.isnan(out["web_score"][1])
    scores = decode_list(out["caption_scores"][0])
    assert len(decode_list(out["captions"][0])) == 2 and scores[0] >= scores[1]
    strict = CaptionFilter(FilterConfig(threshold=1.0))(captioned)
    assert strict["status"][0] == "filtered" and strict["best_score"][0] == pytest.approx(out["best_score"][0])


def test_beam_search_captions_are_the_best_beams_and_draw_nothing(records, tmp_path, one_thread):
    pixels = np.stack([r["pixels"] for r in _decoded(records[:3], "webdataset", tmp_path) if r["status"] == "ok"])
    config = CaptionerConfig(num_captions=2, decoding="beam", num_beams=3, max_new_tokens=6, min_new_tokens=2)
    beam = Captioner(config)
    assert (beam.params.num_beams, beam.params.do_sample, beam.params.num_return_sequences) == (3, False, 2)
    captions = beam.caption(pixels, seed=1)
    assert captions == beam.caption(pixels, seed=2)  # a search, not a draw: the seed changes nothing
    best = generate_captions(beam.model, beam.tokenizer, to_pixel_values(pixels, beam.image_processor), None,
                             beam.params)  # transformers' beam search, its two best of three beams per image
    assert captions == [[t for t in best[2 * i : 2 * i + 2] if t] for i in range(len(pixels))]
    nucleus = Captioner(CaptionerConfig(num_captions=2, max_new_tokens=6, min_new_tokens=2))
    assert nucleus.params.do_sample and nucleus.params.top_p == 0.9 and nucleus.params.num_beams == 1  # the default
    with pytest.raises(ValueError, match="num_beams"):
        CaptionerConfig(num_captions=4, decoding="beam", num_beams=3)
    with pytest.raises(ValueError, match="decoding"):
        CaptionerConfig(decoding="greedy")


def test_threshold_calibration_pairs_and_choice():
    from blip2.capfilt.calibrate import calibration_pairs, choose_threshold
    from blip2.toyworld.corpus import ToyWorldConfig, generate_split
    from blip2.toyworld.text import caption_matches

    records = generate_split(ToyWorldConfig(seed=5, val_size=9), "val")
    images, texts, right = calibration_pairs(records)
    assert images.shape == (9, 64, 64, 3) and all(r == [True, False] for r in right)
    for record, (good, bad) in zip(records, texts, strict=True):
        assert caption_matches(good, record.attributes) and not caption_matches(bad, record.attributes)
    chosen = choose_threshold([0.9, 0.8, 0.7, 0.2, 0.1, 0.75], [True, True, True, False, False, False])
    assert chosen["threshold"] == pytest.approx(0.775) and (chosen["tp"], chosen["fp"], chosen["fn"]) == (3, 1, 0)


def test_calibrate_scores_every_pair_and_separates_an_oracle():
    """An oracle that reads the attributes off the pixels and checks the caption against them: the chosen
    threshold separates right from wrong captions perfectly, whatever the batch size."""
    from blip2.capfilt.calibrate import calibrate
    from blip2.toyworld.corpus import ToyWorldConfig, generate_split
    from blip2.toyworld.text import caption_matches
    from blip2.toyworld.world import read_attributes

    class Oracle:
        def score(self, pixels, texts):
            return [np.array([float(caption_matches(t, read_attributes(p))) for t in group])
                    for p, group in zip(pixels, texts, strict=True)]

    records = generate_split(ToyWorldConfig(seed=5, val_size=12), "val")
    chosen = calibrate(Oracle(), records, batch_size=5)
    assert chosen["pairs"] == 24 and 0 < chosen["threshold"] < 1
    assert chosen["precision"] == chosen["recall"] == 1.0
    assert calibrate(Oracle(), records, batch_size=64) == chosen


def test_itc_score_is_the_models_own_similarity(records, tmp_path, one_thread):
    import torch

    rows = [r for r in _decoded(records[:1], "webdataset", tmp_path) if r["status"] == "ok"]
    pixels = np.stack([r["pixels"] for r in rows])
    texts = [["a small red circle on the left", "IMG_0412.JPG"]]
    scorer = CaptionFilter(FilterConfig(score="itc", threshold=-1.0))
    (scores,) = scorer.score(pixels, texts)
    from blip2.capfilt.models import to_pixel_values
    with torch.no_grad():
        embeds = scorer.model.encode_images(to_pixel_values(pixels, scorer.image_processor))
        tokens = scorer.tokenizer(texts[0], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        expected = scorer.model.itc_similarity(scorer.model.image_features(embeds),
                                               scorer.model.text_features(tokens.input_ids, tokens.attention_mask))[0]
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    with pytest.raises(ValueError):
        FilterConfig(score="itm", threshold=-0.5)


def test_the_filter_loads_a_retrieval_directory_in_salesforce_layout(records, tmp_path, one_thread):
    """No side file of ours and a tokenizer without [DEC]: the filter needs ITM and ITC only."""
    from tests.blip2.test_serving_runtime import write_salesforce_layout_retrieval

    write_salesforce_layout_retrieval(tmp_path / "itm")
    scorer = CaptionFilter(FilterConfig(source=str(tmp_path / "itm"), threshold=0.0))
    assert scorer.model.itg_head is None
    rows = [r for r in _decoded(records[:1], "webdataset", tmp_path) if r["status"] == "ok"]
    (scores,) = scorer.score(np.stack([r["pixels"] for r in rows]), [["a small red circle on the left", "a dog"]])
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)

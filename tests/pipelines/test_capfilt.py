"""CapFilt on a real local Ray instance: every bad-record kind in all three input formats, the
accounting invariant, resume after an interruption, and a filter actor killed mid-run."""

import json
import os
import signal
import threading
import time
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from tests import badcorpus
from blip2.capfilt.config import CapFiltConfig, CaptionerConfig, FilterConfig, InputConfig
from blip2.capfilt.outputs import FILTERED_SCHEMA, KEPT_SCHEMA, REJECTED_SCHEMA
from blip2.toyworld.corpus import iter_webdataset
from pipelines import capfilt

pytestmark = pytest.mark.ray

FAST = ["captioner.num_captions=1", "captioner.max_new_tokens=6", "captioner.min_new_tokens=2",
        "filter.source=toy-stage1", "filter.threshold=0.5"]


def fast_config(**changes) -> CapFiltConfig:
    return CapFiltConfig(captioner=CaptionerConfig(num_captions=1, max_new_tokens=6, min_new_tokens=2),
                         filter=FilterConfig(source="toy-stage1", threshold=0.5), **changes)


def table(out, folder):
    return pq.read_table(sorted((out / folder).glob("*.parquet")))


def kept_keys(out):
    return [k for p in sorted((out / "kept").glob("*.parquet")) for k in pq.read_table(p).column("key").to_pylist()]


@pytest.fixture(scope="module")
def bad(small_world):
    root, _ = small_world
    record = next(iter_webdataset(sorted((root / "webdataset" / "val").glob("*.tar"))))
    return badcorpus.bad_records(record["jpg"], record["txt"])


@pytest.mark.timeout(180)
def test_webdataset_every_bad_kind_through_the_cli(ray_local, bad, small_world, tmp_path, capsys):
    root, _ = small_world
    shards = tmp_path / "shards"
    badcorpus.write_webdataset(bad, shards / "bad.tar")
    (shards / "val.tar").write_bytes((root / "webdataset" / "val" / "00000.tar").read_bytes())
    out = tmp_path / "out"
    assert capfilt.main([f"input.path={shards}", f"output={out}", *FAST]) == 0
    printed = capsys.readouterr().out
    total = len(bad) + 40
    assert "accounting: input %d = kept" % total in printed and "-> OK" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["invariant_holds"] and report["counts"]["input"] == total
    expected = [r.expect for r in bad]
    assert report["rejected_by_reason"] == {reason: expected.count(reason) for reason in badcorpus.REJECTION_REASONS}
    assert report["web_caption_issues"] == {i: 1 for i in ("empty_caption", "missing_caption", "non_utf8_caption",
                                                           "overlong_caption")}
    assert report["filter_quality"]["records"] == 40  # only the val shard carries ground truth
    assert (out / "scores.png").stat().st_size > 1000

    rejected = table(out, "rejected")
    assert rejected.schema == REJECTED_SCHEMA
    assert dict(zip(rejected.column("key").to_pylist(), rejected.column("reason").to_pylist())) == {
        r.key: r.expect for r in bad if r.expect in badcorpus.REJECTION_REASONS}
    kept, filtered = table(out, "kept"), table(out, "filtered")
    assert kept.schema == KEPT_SCHEMA and filtered.schema == FILTERED_SCHEMA
    valid = set(kept.column("key").to_pylist()) | set(filtered.column("key").to_pylist())
    assert {"cmyk", "sixteen_bit", "rgba", "palette", "greyscale", "empty_caption", "non_utf8_caption"} <= valid
    for captions, sources, scores in zip(*(kept.column(c).to_pylist() for c in
                                           ("captions", "caption_sources", "caption_scores")), strict=True):
        assert 1 <= len(captions) <= 2 and len(sources) == len(scores) == len(captions)
        assert set(sources) <= {"web", "synthetic"} and scores == sorted(scores, reverse=True) and min(scores) >= 0.5
    assert all(image is not None for image in kept.column("image").to_pylist())

    # A second run finds every shard done: nothing is redone and the report is the same.
    assert capfilt.main([f"input.path={shards}", f"output={out}", *FAST]) == 0
    assert "0 to process" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["counts"] == report["counts"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fmt", ["parquet", "coco"])
def test_parquet_and_coco_inputs(ray_local, bad, tmp_path, fmt):
    if fmt == "parquet":
        source = InputConfig(format="parquet", path=str(badcorpus.write_parquet(bad, tmp_path / "in" / "bad.parquet")))
    else:
        path = badcorpus.write_coco_corpus(bad, tmp_path / "coco")
        source = InputConfig(format="coco", path=str(path), images=str(tmp_path / "coco" / "images"), shard_size=6)
    out = tmp_path / "out"
    report = capfilt.run(fast_config(input=source, output=str(out), image_mode="reference"))
    n = len(bad) - (fmt == "coco")  # COCO's JSON cannot carry the non-UTF-8 caption
    assert report["invariant_holds"] and report["counts"]["input"] == n
    assert report["shards"] == (1 if fmt == "parquet" else 3)
    reasons = dict(report["rejected_by_reason"])
    if fmt == "coco":
        assert reasons.pop("missing_file") == 1
        reasons["missing_image"] = 1
    assert reasons == {r: 1 for r in badcorpus.REJECTION_REASONS}
    kept = table(out, "kept")
    assert all(image is None for image in kept.column("image").to_pylist())  # reference mode
    assert all(ref for ref in kept.column("image_ref").to_pylist())


def web_shards(tmp_path_factory, records: int, shard_size: int):
    """The small world's first ``records`` web records as WebDataset shards of ``shard_size``."""
    from tests.conftest import SMALL_WORLD
    from blip2.toyworld.corpus import generate_split, write_webdataset

    root = tmp_path_factory.mktemp("web_shards")
    write_webdataset(generate_split(SMALL_WORLD, "web")[:records], root, shard_size, SMALL_WORLD.image_size)
    return root


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """96 web records of the small world in three WebDataset shards of 32."""
    return web_shards(tmp_path_factory, 96, 32)


@pytest.mark.timeout(240)
def test_resume_after_interruption_no_duplicates_no_gaps(ray_local, three_shards, tmp_path):
    out = tmp_path / "out"
    config = fast_config(input=InputConfig(path=str(three_shards)), output=str(out))
    assert capfilt.run(replace(config, max_shards=1)) is None  # interrupted after one shard
    assert sorted(p.stem for p in (out / "_done").glob("*.json")) == ["00000"]
    first = (out / "kept" / "00000.parquet").read_bytes()
    # What a crash leaves behind: a temporary file, and a shard whose files were written but whose
    # marker was not (here: shard 00001's kept file holding shard 00000's rows).
    (out / "kept" / ".00001.parquet.tmp").write_bytes(b"partial")
    (out / "kept" / "00001.parquet").write_bytes(first)

    report = capfilt.run(config)
    assert report["invariant_holds"] and report["counts"]["input"] == 96 and report["shards"] == 3
    keys = kept_keys(out)
    assert len(keys) == len(set(keys)) == report["counts"]["kept"]
    everything = keys + table(out, "filtered").column("key").to_pylist() + table(out, "rejected").column("key").to_pylist()
    assert sorted(everything) == [f"web_{i:06d}" for i in range(96)]  # no gap, no duplicate
    assert (out / "kept" / "00000.parquet").read_bytes() == first  # the finished shard was not redone
    assert not list((out / "kept").glob(".*.tmp"))


def _filter_actor_pids():
    import ray._private.state as state  # the actor table in the GCS: works without the dashboard

    return {a["Pid"] for a in state.actors().values()
            if "FilterActor" in a["ActorClassName"] and a["State"] == "ALIVE" and a["Pid"]}


@pytest.fixture(scope="module")
def twelve_shards(tmp_path_factory):
    """The small world's 300 web records in twelve WebDataset shards of 25: each shard travels through
    the actors as its own block, so shards complete one after another, not all at the end."""
    return web_shards(tmp_path_factory, 300, 25)


@pytest.mark.timeout(240)
def test_killed_filter_actor_is_replaced_and_nothing_is_lost(ray_local, twelve_shards, tmp_path):
    out = tmp_path / "out"
    config = fast_config(input=InputConfig(path=str(twelve_shards)), output=str(out))
    result, errors = {}, []

    def job():
        try:
            result["report"] = capfilt.run(config)
        except Exception as error:  # surfaced below
            errors.append(error)

    thread = threading.Thread(target=job)
    thread.start()
    # The actor table is slow to read (it lists every actor of the session), so find the filter actor
    # first, then watch only the cheap completion markers and kill it as soon as one shard is done.
    pids, deadline = set(), time.monotonic() + 120
    while not pids and thread.is_alive() and time.monotonic() < deadline:
        pids = _filter_actor_pids()
        time.sleep(0.05)
    assert pids, "no filter actor came up"
    while thread.is_alive() and not list((out / "_done").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    done_at_kill = len(list((out / "_done").glob("*.json")))
    assert thread.is_alive() and 1 <= done_at_kill < 12, f"not mid-run: {done_at_kill} of 12 shards done"
    killed = pids.pop()
    os.kill(killed, signal.SIGKILL)
    thread.join(timeout=200)
    assert not errors, errors
    report = result["report"]
    assert report["invariant_holds"] and report["counts"]["input"] == 300 and report["shards"] == 12
    assert report["duplicates_dropped"] == 0
    keys = kept_keys(out)
    assert len(keys) == len(set(keys))
    assert killed not in _filter_actor_pids()


def test_missing_model_or_input_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        capfilt.main([f"input.path={tmp_path}", "filter.source=/no/such/model"])
    assert exit_info.value.code == 1 and "filter.source '/no/such/model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        capfilt.main([f"input.path={tmp_path}/absent", "filter.source=toy-stage1"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        capfilt.main(["filter.threshold=2"])
    assert exit_info.value.code == 2

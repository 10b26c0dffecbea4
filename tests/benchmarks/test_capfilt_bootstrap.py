"""benchmarks/capfilt_bootstrap.py refuses what would make a wrong record (its figures come from running it)."""

import json

import pytest

from tests.benchmarks import load_script


def load():
    return load_script("capfilt_bootstrap")


def test_the_first_seed_must_go_on_to_round_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load().main(["--seeds", "1,2", "--round2-seeds", "2"])
    assert exit_info.value.code == 2 and "must include the first seed (1)" in capsys.readouterr().err


def test_a_reused_round_must_be_that_round_of_this_run(tmp_path):
    """--round1 / --round2 take finished runs only when seed, steps and training data are the round's."""
    module = load()
    world, storage = tmp_path / "world", tmp_path / "storage"
    trained = tmp_path / "stage1-toy-seed1"
    trained.mkdir()
    (trained / "report.json").write_text(json.dumps({"steps": 800, "headline": {},
                                                     "config": {"seed": 1, "train_data": []}}))
    with pytest.raises(SystemExit, match="is not round 1 of this run: it has .*'seed': 1.* wants .*'seed': 0"):
        module.one_round(0, 1, world, storage, [], [], trained)
    kept = [str(world / "webdataset" / "clean"), str(storage / "capfilt-boot-r1-web-itm" / "kept")]
    with pytest.raises(SystemExit, match="is not round 2 of this run"):  # trained on clean alone, not + kept
        module.one_round(1, 2, world, storage, kept, [], trained)


def test_reuse_takes_only_a_finished_run_of_the_same_round(tmp_path):
    module = load()
    run = tmp_path / "capfilt-boot-r1-seed1"
    assert module._trained_as(run) is None  # nothing there: the round trains
    run.mkdir()
    (run / "report.json").write_text("{truncated")
    assert module._trained_as(run) is None
    (run / "report.json").write_text(json.dumps({"steps": 800, "config": {"seed": 1, "train_data": ["a", "b"]}}))
    assert module._trained_as(run) == {"seed": 1, "steps": 800, "train_data": ["a", "b"]}

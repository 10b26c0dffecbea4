"""benchmarks/capfilt_bootstrap.py refuses what would make a wrong record (its figures come from running it)."""

import json

import pytest

from blip2.config import to_dict
from tests.benchmarks import BENCHMARKS, load_script


def load():
    return load_script("capfilt_bootstrap")


def test_the_first_seed_must_go_on_to_round_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load().main(["--seeds", "1,2", "--round2-seeds", "2"])
    assert exit_info.value.code == 2 and "must include the first seed (1)" in capsys.readouterr().err


def _finished(run, config, **changes) -> None:
    """A finished run's report at ``run``: ``config`` as it would be recorded, with ``changes``."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "report.json").write_text(json.dumps({"steps": config.optim.max_steps, "time_split": {}, "headline": {},
                                                 "config": {**json.loads(json.dumps(to_dict(config))), **changes}}))


def _round_config(seed, round_, world, storage, train_data=()):
    return load().round_config(seed, round_, world, storage, list(train_data))[0]


def test_a_reused_round_must_be_that_round_of_this_run(tmp_path):
    """--round1 / --round2 take finished runs only when they trained as the round's config says (paths aside)."""
    module = load()
    world, storage = tmp_path / "world", tmp_path / "storage"
    trained = tmp_path / "stage1-toy-seed1"
    _finished(trained, _round_config(1, 1, world, storage), name="stage1-toy-seed1", storage_path=str(tmp_path))
    with pytest.raises(SystemExit, match="is not round 1 of this run .*seed 0.*: it trained with other seed$"):
        module.one_round(0, 1, world, storage, [], [], trained)
    kept = [str(world / "webdataset" / "clean"), str(storage / "capfilt-boot-r1-web-itm" / "kept")]
    with pytest.raises(SystemExit, match="is not round 2 of this run.*other train_data$"):  # clean alone
        module.one_round(1, 2, world, storage, kept, [], trained)
    (trained / "report.json").write_text("{truncated")
    with pytest.raises(SystemExit, match="holds no readable report.json"):
        module.one_round(1, 1, world, storage, [], [], trained)


def test_reuse_takes_only_a_finished_run_of_the_same_round(tmp_path):
    module = load()
    world, storage = tmp_path / "world", tmp_path / "storage"
    config = _round_config(1, 1, world, storage)
    assert module.reuse_refusal(config)  # nothing there: the round trains
    _finished(config.output, config, loss={**json.loads(json.dumps(to_dict(config.loss))), "itm_weight": 2.0})
    assert module.reuse_refusal(config) == "it trained with other loss"
    _finished(config.output, config, rerank_itc_scale=1.0)  # only how it is scored differs
    assert module.reuse_refusal(config) == ""
    (config.output / "report.json").write_text(json.dumps({"steps": 800, "config": {}}))  # no goodput split
    assert "not a finished run's" in module.reuse_refusal(config)


def test_the_toy_config_filters_at_the_committed_record_s_val_threshold():
    # capfilt_toy.yaml says its threshold is the committed bootstrap's `val` choice (first seed, round 2,
    # the config's score); a regenerated record that moves it must move the config too.
    import yaml

    config = yaml.safe_load((BENCHMARKS.parent / "pipelines/configs/capfilt_toy.yaml").read_text())["filter"]
    record = json.loads((BENCHMARKS / "capfilt_bootstrap.json").read_text())
    first_seed = record["rounds"][0]["seed"]
    round2 = next(row for row in record["rounds"] if row["seed"] == first_seed and row["round"] == 2)
    chosen = round2["scores"][config.get("score", "itm")]["val"]["threshold"]
    assert config["threshold"] == pytest.approx(chosen, abs=5e-4)

"""benchmarks/toy_runs.py --reuse: a finished run is scored again only when it trained as the config says."""

import json

import pytest

from blip2.config import load_config, to_dict
from tests.benchmarks import load_script


def load():
    return load_script("toy_runs")


def _config(module, tmp_path, *overrides):
    return module.absolute_paths(load_config(module.TASKS["stage1"][0], module.CONFIG_DIR / "stage1_toy.yaml",
                                             [f"storage_path={tmp_path}", "name=run", *overrides]))


def _finish(config, recorded: dict) -> None:
    config.output.mkdir(parents=True, exist_ok=True)
    (config.output / "report.json").write_text(json.dumps(
        {"steps": config.optim.max_steps, "time_split": {}, "started_at": [1.0], "config": recorded}))


def test_a_run_is_reused_when_only_how_it_is_scored_changed(tmp_path):
    module = load()
    trained = _config(module, tmp_path, "rerank_itc_scale=1", "itm_eval_images=20", "eval=[]")
    _finish(trained, to_dict(trained))
    now = _config(module, tmp_path)
    assert now.rerank_itc_scale != trained.rerank_itc_scale
    assert module.finished_run(now) is not None


@pytest.mark.parametrize("change", ["seed=1", "loss.itm_weight=2", "optim.max_steps=100"])
def test_a_run_that_trained_otherwise_is_not_reused(tmp_path, change):
    module = load()
    trained = _config(module, tmp_path, change)
    _finish(trained, to_dict(trained))
    assert module.finished_run(_config(module, tmp_path)) is None


def test_a_key_added_since_must_hold_its_default(tmp_path):
    """A report written before a config key existed trained as that key's default does."""
    module = load()
    config = _config(module, tmp_path)
    recorded = json.loads(json.dumps(to_dict(config)))
    del recorded["loss"]["itm_random_negatives"]  # as if the key came later
    _finish(config, recorded)
    assert module.finished_run(config) is not None
    assert module.finished_run(_config(module, tmp_path, "loss.itm_random_negatives=0.5")) is None
    (config.output / "report.json").write_text("{not json")
    assert module.finished_run(config) is None


def test_reuse_needs_the_storage_of_earlier_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load().main(["--reuse"])
    assert exit_info.value.code == 2 and "--reuse needs --storage" in capsys.readouterr().err

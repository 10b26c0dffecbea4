"""benchmarks/stage1_sweep.py: the base configs it compares recipes on, and its per-recipe summary (the
training itself is the stage-1 training loop, tested in tests/blip2/training)."""

import pytest

from benchmarks.stage1_sweep import base_config, batches_for, main, summary


def test_the_demo_base_is_the_demos_stage1_section_and_recipes_override_it():
    from pipelines.common import CONFIG_DIR
    from pipelines.demo import DemoConfig
    from blip2.config import load_config

    demo = load_config(DemoConfig, CONFIG_DIR / "demo.yaml").stage1
    assert base_config("demo", []) == demo
    changed = base_config("demo", ["loss.itm_random_negatives=0.5", "optim.max_steps=40"])
    assert (changed.loss.itm_random_negatives, changed.optim.max_steps) == (0.5, 40)
    assert changed.model == demo.model  # everything else stays the demo's
    assert base_config("toy", []).optim.max_steps == 800  # stage1_toy.yaml


def test_summary_gives_mean_and_range_per_recipe():
    rows = [{"recipe": "base", "seed": seed, "steps": 10, "t2i_r1_attribute_itc": value,
             "t2i_r1_attribute_itm": 0.5, "t2i_r1_attribute@150": value, "itm_pairwise_random": 0.9,
             "itm_pairwise_one_attribute": 0.8, "itm_balanced_random": 0.7, "itm_balanced_one_attribute": 0.6,
             "itm_right_accuracy": 0.5} for seed, value in ((0, 0.2), (1, 0.6))]
    lines = summary(rows, [150.0])
    assert lines[0] == "base (10 steps, seeds 0,1)"
    assert any(line.split() == ["t2i_r1_attribute_itc", "0.400", "[0.200,", "0.600]"] for line in lines)


def test_bad_seeds_are_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["--seeds", "zero"])
    assert exit_info.value.code == 2


def test_each_batch_size_gets_its_own_feature_batches():
    """A recipe that changes ``optim.batch_size`` trains at that size, not at the first recipe's."""
    cache: dict = {}
    small = ["world.clean_size=48"]
    of_16 = batches_for(base_config("demo", [*small, "optim.batch_size=16"]), cache)
    of_8 = batches_for(base_config("demo", [*small, "optim.batch_size=8"]), cache)
    assert [len(b["image_embeds"]) for b in of_16] == [16] * 3 and [len(b["image_embeds"]) for b in of_8] == [8] * 6
    assert batches_for(base_config("demo", [*small, "optim.batch_size=16", "seed=1"]), cache) is of_16  # reused

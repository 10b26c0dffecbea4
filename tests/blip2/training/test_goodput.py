"""The time split and goodput arithmetic of a training job's report (no Ray: the clocks are given)."""

import pytest

from blip2.training.goodput import FIXED_COSTS, describe_goodput, time_split

DRIVER = {"started": 1000.0, "input_check": 2.0, "feature_cache": 3.0, "fit_returned": 1080.0,
          "evaluation": 6.0, "export": 4.0, "finished": 1090.0}
WORKER = {"loop_started": 1015.0, "loop": 60.0, "data_wait": 6.0, "batch_prep": 3.0, "step_compute": 48.0,
          "checkpointing": 2.0, "samples": 3000, "step_samples_per_s": 62.5, "probe_steps": 4, "probe": 2.0}


def test_phases_add_up_to_the_wall_time_and_goodput_is_the_loop_over_its_own_step():
    split = time_split(DRIVER, WORKER)
    seconds = split["seconds"]
    assert seconds["startup"] == 10.0  # 15 s to the first batch request, 5 of them input check and cache
    assert seconds["loop_other"] == 1.0 and seconds["shutdown"] == 3.0  # 80 - 15 - 60 - 2 (probe)
    assert sum(v for k, v in seconds.items() if k != "wall") == pytest.approx(seconds["wall"]) == 90.0
    goodput = split["goodput"]
    assert goodput["samples_per_s"] == 50.0 and goodput["ratio"] == 0.8  # 3000 / 60 s over 62.5
    assert goodput["fixed_fraction"] == pytest.approx(sum(seconds[k] for k in FIXED_COSTS) / 90, abs=1e-3)
    line = describe_goodput(split)
    assert line.startswith("goodput 0.80 (50 of 62 samples/s); 90s: step 53%")
    kept = time_split({**DRIVER, "materialize": 1.0}, WORKER)["seconds"]  # records held in the object store
    assert kept["materialize"] == 1.0 and kept["startup"] == 9.0 and kept["wall"] == 90.0


def test_without_a_probe_the_line_gives_the_job_rate_alone():
    worker = {k: v for k, v in WORKER.items() if k not in ("step_samples_per_s", "probe_steps", "probe")}
    split = time_split(DRIVER, worker)
    assert split["goodput"]["ratio"] is None and describe_goodput(split).startswith("50 samples/s; 90s:")

"""The plan's arithmetic on one real-size job (serving BLIP-2 OPT-2.7B: the cheapest to trace)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blip2.config import ConfigError, from_dict
from blip2.planning.config import GPUS, PlanConfig
from blip2.planning.measure import FakeTensorMode, measure_step, to_fake
from blip2.planning.plan import GIB, plan_jobs, plan_row
from blip2.planning.table import format_table


@pytest.fixture(scope="module")
def serve_row():
    return plan_row(PlanConfig(), "blip2-opt-2.7b", "serve")


def test_flops_are_counted_and_near_two_per_parameter_per_token(serve_row):
    row = serve_row
    config = PlanConfig()
    # Decoding P prompt + T new tokens through OPT-2.7B costs about 2 x params x (32 queries + P + T) FLOPs
    # per request, and the ViT-g about 2 x params x 257 patches: the counted total lands near that.
    rough = 2 * 2.65e9 * (32 + config.prompt_length + config.new_tokens) + 2 * 0.986e9 * 257
    per_request = row.tflop_per_step * 1e12 / row.batch
    assert 0.8 < per_request / rough < 1.3, per_request / rough
    assert row.requests_per_second == pytest.approx(row.batch / row.step_seconds)


def test_memory_is_weights_plus_traced_peak_and_the_largest_batch_fits(serve_row):
    row = serve_row
    assert row.weights_gib == pytest.approx(3.745e9 * 2 / GIB, rel=0.01)  # bf16 weights, nothing trains
    assert row.weights_gib < row.memory_gib < 40 * 0.9
    assert row.max_batch > row.batch  # a 2.7B model serving 32 requests leaves room on an A100-40G
    assert row.steps is None and row.gpu_hours is None


def test_flop_counter_counts_a_linear_layer_exactly():
    mode = FakeTensorMode()
    layer = to_fake(nn.Linear(64, 32, device="meta"), mode)

    def step():
        layer(torch.empty(8, 64, requires_grad=True)).sum().backward()

    measure = measure_step([layer], step, mode)
    assert measure.flops == 3 * 2 * 8 * 64 * 32  # forward, grad of input, grad of weight
    assert measure.peak_with_grads_bytes >= (32 * 64 + 32) * 4  # the weight's and bias' gradients


def test_stage1_once_per_image_encoder_stage2_for_blip2_instruct_for_instructblip():
    jobs = plan_jobs(PlanConfig())
    assert [j for j in jobs if j[1] == "stage1"] == [("blip2-opt-2.7b", "stage1")]
    assert {n for n, s in jobs if s == "stage2"} == {"blip2-opt-2.7b", "blip2-opt-6.7b", "blip2-flan-t5-xl",
                                                      "blip2-flan-t5-xxl"}
    assert {n for n, s in jobs if s == "instruct"} == {"instructblip-vicuna-7b", "instructblip-flan-t5-xl"}
    assert len(plan_jobs(PlanConfig(vision="vit-l", stages=("stage1",)))) == 1


@pytest.mark.parametrize("override, message", [
    ({"gpu": "v100"}, "unknown gpu"), ({"presets": ["blip3"]}, "unknown preset"),
    ({"stages": ["stage3"]}, "unknown stage"), ({"mfu": 1.5}, "mfu"), ({"workers": 0}, "workers"),
])
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PlanConfig, override)


def test_every_built_in_gpu_has_memory_and_a_bf16_peak():
    assert set(GPUS) == {"a100-40g", "a100-80g", "h100-80g", "l4", "a10g"}
    assert all(g.memory_gib > 0 and g.bf16_tflops > 0 for g in GPUS.values())


def test_table_has_a_row_per_job_and_says_how_it_was_counted(serve_row):
    text = format_table([serve_row], PlanConfig())
    header, rule, line = text.splitlines()[:3]
    assert header.split()[:2] == ["preset", "stage"] and set(rule) <= {"-", " "}
    assert line.startswith("blip2-opt-2.7b") and "16x A100-40G" in line
    assert "FlopCounterMode" in text and "MFU fixed at 40%" in text and "requests/s" in text

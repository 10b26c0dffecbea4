"""The toy-world quality bars of the training stages, measured on the held-out `test` split.

The slow tier trains each stage with its shipped toy config on Ray Train, one after the other, and
asserts each stage's bar (the README's training results), zero-shot yes/no above chance included. The fast tier (CI) trains stage 1 alone, in-process from
cached image features, on a smaller budget with a smaller bar: far above chance, which is a few
percent for text->image R@1 among 100 images.
"""

import json

import numpy as np
import pytest
import torch

from blip2.config import load_config
from blip2.matching import evaluate_matching
from blip2.toyworld.corpus import generate_split
from blip2.toyworld.text import INSTRUCTION_TASKS
from blip2.toyworld.world import decode_image
from blip2.training.config import Stage1Config
from blip2.training.features import FrozenImageEncoder
from blip2.training.loop import train_locally
from blip2.training.tasks import Stage1Task
from pipelines.common import CONFIG_DIR

FAST_STEPS = 150
FAST_BAR = 0.6
FAST_ITM_BAR = 0.8  # pairwise ITM accuracy against random wrong captions (chance 0.5)


@pytest.fixture(scope="module")
def fast_stage1():
    """Stage 1 trained in-process from cached image features on the fast budget (shared by the CI tests)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    config = load_config(Stage1Config, CONFIG_DIR / "stage1_toy.yaml", [f"optim.max_steps={FAST_STEPS}",
                                                                        "optim.warmup_steps=20"])
    task = Stage1Task(config)
    records = generate_split(config.world, config.train_split)
    encoder = FrozenImageEncoder(task.backbones.vision)
    size = config.optim.batch_size
    cached = [encoder({"jpg": np.stack([decode_image(r.image) for r in records[s : s + size]]),
                       "txt": np.array([r.alt_text for r in records[s : s + size]], dtype=object)})
              for s in range(0, len(records) - size + 1, size)]
    model, history = train_locally(task, lambda epoch: [cached[i] for i in np.random.default_rng(epoch).permutation(len(cached))])
    yield task, model, history
    torch.set_num_threads(previous)


def test_stage1_learns_retrieval_on_a_small_budget(fast_stage1):
    task, model, history = fast_stage1
    assert history[-1]["itc_loss"] < history[0]["itc_loss"]
    metrics = task.evaluate(model, generate_split(task.config.world, "test"))
    assert metrics["num_candidates"] == 100
    assert metrics["t2i_r1_attribute_itc"] >= FAST_BAR, metrics
    assert "novel" in metrics and "itm_pairwise_random" in metrics  # ITM and the novel split are reported


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known gap: ITM has not left the class prior on this budget (README, Training: "
                          "what ITM does on the shipped budget)")
def test_stage1_itm_tells_a_random_wrong_caption_from_the_right_one(fast_stage1):
    """ITM, not a loss: held-out images, P(match) of the right caption above that of a random wrong one."""
    task, model, _ = fast_stage1
    metrics = evaluate_matching(model, task.tokenizer, generate_split(task.config.world, "test"), num_images=200)
    assert metrics["itm_pairwise_random"] >= FAST_ITM_BAR, metrics


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory, ray_local):
    """The three stages with their shipped toy configs, chained as the README runs them."""
    from pipelines import train

    out = tmp_path_factory.mktemp("train")
    common = [f"storage_path={out}", f"toyworld={out / 'world'}"]
    assert train.main(["stage1", *common]) == 0
    assert train.main(["stage2", *common, f"stage1={out / 'stage1-toy'}"]) == 0
    assert train.main(["instruct", *common, f"stage2={out / 'stage2-toy-opt'}"]) == 0
    return {name: json.loads((out / name / "report.json").read_text())["eval"]
            for name in ("stage1-toy", "stage2-toy-opt", "instruct-toy-opt")}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(3600)
def test_default_toy_configs_reach_the_bars(default_runs):
    stage1, stage2, instruct = default_runs.values()
    assert stage1["num_candidates"] == 100 and stage1["t2i_r1_attribute_itc"] >= 0.90, stage1
    assert stage2["caption_accuracy"] >= 0.90, stage2
    assert instruct["accuracy/held_in"] >= 0.90, instruct


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(3600)
def test_instruction_tuning_answers_the_held_out_family_above_chance(default_runs):
    instruct = default_runs["instruct-toy-opt"]
    # yes/no: chance is 0.5. Above it means more than noise: 60 right of 100 questions happens by chance
    # with probability 0.03. Measured 0.97-0.98 over three instruct seeds (README "Training"), but
    # 0.64-0.68 over three with an LM pretrained on the previous tokenizer: the bar is chance, not 0.97.
    assert instruct["num_examples"] == 100 * len(INSTRUCTION_TASKS)  # 100 questions per family
    assert instruct["accuracy/held_out"] >= 0.6, instruct

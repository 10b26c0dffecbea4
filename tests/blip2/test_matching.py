"""ITM as a metric: pairs drawn from the truth, and the scores of oracle, constant and inverted models."""

import pytest
import torch

import numpy as np

from blip2.matching import matching_pairs, one_attribute_wrong, score_matching
from blip2.toyworld.text import parse_attributes
from blip2.toyworld.world import ATTRIBUTES, all_attributes


def test_pairs_are_right_one_attribute_wrong_and_random_wrong():
    truth = all_attributes()[::7]
    pairs = matching_pairs(truth, seed=3)
    assert pairs == matching_pairs(truth, seed=3)  # fixed seed: equal arguments, equal pairs
    for attributes, right, one, random in zip(truth, pairs.right, pairs.wrong["one_attribute"],
                                              pairs.wrong["random"], strict=True):
        true = attributes.as_dict()
        assert parse_attributes(right) == true
        assert sum(parse_attributes(one)[name] != true[name] for name in ATTRIBUTES) == 1
        assert parse_attributes(random) != true


def test_one_attribute_wrong_changes_the_named_attribute_or_a_random_one():
    rng = np.random.default_rng(0)
    for truth in all_attributes()[::11]:
        for name in ATTRIBUTES:
            wrong = one_attribute_wrong(truth, rng, name)
            assert [n for n in ATTRIBUTES if getattr(wrong, n) != getattr(truth, n)] == [name]
        wrong = one_attribute_wrong(truth, rng)
        assert sum(getattr(wrong, n) != getattr(truth, n) for n in ATTRIBUTES) == 1
    with pytest.raises(ValueError, match="no attribute 'texture'"):
        one_attribute_wrong(truth, rng, "texture")


def test_scores_of_oracle_constant_and_inverted_models():
    n = 10
    right, wrong = torch.full((n,), 0.9), {"one_attribute": torch.full((n,), 0.1), "random": torch.full((n,), 0.2)}
    oracle = score_matching(right, wrong)
    assert oracle == {"itm_right_accuracy": 1.0, "itm_pairwise_one_attribute": 1.0, "itm_balanced_one_attribute": 1.0,
                      "itm_pairwise_random": 1.0, "itm_balanced_random": 1.0}
    constant = score_matching(torch.full((n,), 0.3), {"random": torch.full((n,), 0.3)})
    assert constant["itm_pairwise_random"] == 0.5 and constant["itm_balanced_random"] == 0.5
    inverted = score_matching(wrong["random"], {"random": right})
    assert inverted["itm_pairwise_random"] == 0.0 and inverted["itm_balanced_random"] == 0.0
    with pytest.raises(ValueError, match="random"):
        score_matching(right, {"random": torch.ones(n + 1)})


def test_evaluate_matching_in_process_scores_three_pairs_per_image():
    from transformers import AutoTokenizer

    from blip2.backbones.build import find_backbones
    from blip2.matching import evaluate_matching
    from blip2.models.stage1 import build_stage1_model
    from blip2.toyworld.corpus import ToyWorldConfig, generate_split

    backbones = find_backbones()
    torch.manual_seed(0)
    model = build_stage1_model(backbones.vision, backbones.qformer_tokenizer, num_query_tokens=4,
                               image_text_hidden_size=32, hidden_size=64, num_layers=1, num_heads=4,
                               intermediate_size=128).train()
    tokenizer = AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)
    records = generate_split(ToyWorldConfig(seed=1, test_size=12), "test")
    metrics = evaluate_matching(model, tokenizer, records, num_images=12, batch_size=5)
    assert model.training  # the caller's mode is restored
    assert metrics["itm_num_images"] == 12
    assert {"itm_pairwise_random", "itm_balanced_random", "itm_pairwise_one_attribute",
            "itm_balanced_one_attribute", "itm_right_accuracy"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "itm_num_images")
    assert evaluate_matching(model, tokenizer, records, num_images=12, batch_size=12) == metrics

import numpy as np
import torch

from blip2.backbones.vision import (
    VisionPretrainConfig,
    build_vision_config,
    linear_probe,
    pretrain_vision,
    sample_images,
)
from blip2.toyworld.corpus import split_attributes
from transformers import Blip2VisionModel

# About 15 s here; the build's full config reaches >= 0.95 (see test_build.py and the build report).
TINY = VisionPretrainConfig(hidden_size=96, num_layers=2, num_heads=4, intermediate_size=128, batch_size=64,
                            steps=200, warmup_steps=20, learning_rate=3e-3)


def test_initialisation_is_not_the_near_zero_default():
    # Blip2VisionConfig's default initializer_range (1e-10) stalls training from scratch.
    assert build_vision_config(TINY).initializer_range == 0.02


def test_short_pretraining_beats_a_random_encoder_on_a_held_out_probe():
    """A small budget and a smaller bar than the build's: the pretrained encoder's frozen features
    support a linear probe far better than the same architecture left random."""
    torch.manual_seed(0)
    attributes = split_attributes("web")
    rng = np.random.default_rng(11)
    train = sample_images(attributes, 600, rng, 64, 92)
    held_out = {"held_out": sample_images(attributes, 300, rng, 64, 92)}
    trained = pretrain_vision(TINY, attributes, log=lambda _: None)
    assert not trained.training and not any(p.requires_grad for p in trained.parameters())
    random = Blip2VisionModel(build_vision_config(TINY)).eval()
    ours = linear_probe(trained, train, held_out, steps=200)["held_out"]
    baseline = linear_probe(random, train, held_out, steps=200)["held_out"]
    assert ours["mean"] > baseline["mean"] + 0.1, (ours, baseline)
    assert ours["shape"] > baseline["shape"] + 0.2, (ours, baseline)  # shape is the hard attribute
    assert ours["colour"] > 0.95, ours


def test_pretraining_is_deterministic_by_seed():
    config = VisionPretrainConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, batch_size=8,
                                  steps=3, warmup_steps=1)
    attributes = split_attributes("web")
    a = pretrain_vision(config, attributes, log=lambda _: None).state_dict()
    b = pretrain_vision(config, attributes, log=lambda _: None).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

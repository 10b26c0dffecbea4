"""Fixtures shared by the model tests."""

import pytest
import torch
from transformers import AutoTokenizer

from blip2.backbones.build import find_backbones


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: on a small shared machine, intra-op threads cost far more in contention
    than they save (measured about 5x slower with the default thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def backbones():
    return find_backbones()


@pytest.fixture(scope="session")
def tokenizer(backbones):
    """The Q-Former's tokenizer."""
    return AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)

"""Fixtures shared by the model tests."""

import pytest
from transformers import AutoTokenizer

from blip2.backbones.build import find_backbones


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def backbones():
    return find_backbones()


@pytest.fixture(scope="session")
def tokenizer(backbones):
    """The Q-Former's tokenizer."""
    return AutoTokenizer.from_pretrained(backbones.qformer_tokenizer)

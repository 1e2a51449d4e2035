"""Shared fixtures: the offline SmolLM2 tokenizer and tiny random models of each architecture."""

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    from tunelab.models.load import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture
def tiny():
    from tunelab.models.tiny import tiny_model

    return tiny_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tests run two pytest-xdist workers on a 2-core machine: one torch thread each avoids oversubscription
# (with 2 threads per worker, small matmuls slow down by an order of magnitude under contention).
torch.set_num_threads(1)

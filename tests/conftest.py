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

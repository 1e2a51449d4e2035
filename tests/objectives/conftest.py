"""Fixtures for the preference tests: a tiny Llama saved as a model folder, and a small pairs file."""

import json

import pytest
from pref_helpers import pair_rows


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and much faster when other processes share the cores (two OpenMP
    threads then wait on each other at every op)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A 2-layer random Llama + the SmolLM2 tokenizer as an HF folder, loadable by `model.name`."""
    from tunelab.models.tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(10)))
    return path


@pytest.fixture
def unpaired_file(tmp_path):
    path = tmp_path / "unpaired.jsonl"
    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
            for i, r in enumerate(pair_rows(10))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

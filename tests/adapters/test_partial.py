"""Partial finetuning (`freeze`): what is selected, tied embeddings, the frozen snapshot, config and errors."""

import pytest
import torch
from adapter_helpers import batch, logits, make, perturb
from pydantic import ValidationError

from tunelab.adapters import base, get_method, partial
from tunelab.config import RunConfig, method_options
from tunelab.errors import TunelabError


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_last_n_blocks_and_index_lists():
    model = make("llama")
    partial.wrap(model, {"layers": 1})
    names = trainable(model)
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert len(names) == 9  # 7 projections + 2 norms of block 1
    model = make("llama")
    partial.wrap(model, {"layers": [-2], "modules": ["model.norm"]})
    assert {n.split(".")[2] for n in trainable(model) if n.startswith("model.layers.")} == {"0"}
    assert "model.norm.weight" in trainable(model)
    model = make("llama")
    partial.wrap(model, {"layers": "none", "modules": [r".*\.mlp\..*_proj"]})
    assert len(trainable(model)) == 2 * 3


@pytest.mark.parametrize("keep_tied", [True, False])
def test_tied_embeddings(keep_tied):
    ids = batch()
    model = make("gemma")  # lm_head.weight IS embed_tokens.weight
    report = partial.wrap(model, {"layers": "none", "train_lm_head": True, "ensure_weight_tying": keep_tied})
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if keep_tied:
        assert sorted(report.tied[0]) == ["lm_head", "model.embed_tokens"] and len(report.tied) == 1
        assert head.weight is emb.weight and head.weight.requires_grad
    else:
        assert not report.tied and head.weight is not emb.weight
        assert head.weight.requires_grad and not emb.weight.requires_grad
        assert model.config.tie_word_embeddings is False
    perturb(model)
    changed = logits(model, ids)
    with partial.disabled(model):  # the frozen snapshot: exactly the base model
        torch.testing.assert_close(logits(model, ids), logits(make("gemma"), ids), atol=0, rtol=0)
    partial.merge(model)
    torch.testing.assert_close(logits(model, ids), changed, atol=0, rtol=0)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == keep_tied


def test_alias_config_and_registry():
    cfg = RunConfig(method="partial", freeze={"layers": 3, "train_embeddings": True})
    assert cfg.method == "freeze" and method_options(cfg).layers == 3
    assert get_method("partial") is get_method("freeze") is partial
    with pytest.raises(ValidationError):
        RunConfig(method="freeze", freeze={"layer": 2})
    with pytest.raises(TunelabError, match="cannot train the last 5 blocks"):
        partial.wrap(make(), {"layers": 5})
    with pytest.raises(TunelabError, match="block 7 does not exist"):
        partial.wrap(make(), {"layers": [7]})
    with pytest.raises(TunelabError, match="nothing to train"):
        partial.wrap(make(), {"layers": "none"})
    with pytest.raises(TunelabError, match="matches no module"):
        partial.wrap(make(), {"layers": 1, "modules": ["nonexistent"]})
    model = make()
    partial.wrap(model, {"layers": 1})
    with pytest.raises(TunelabError, match="already has an adapter"):
        partial.wrap(model, {"layers": 1})
    assert base.has_adapter(model)

"""Partial finetuning on every tiny architecture: trains, the saved HF model and the tunelab format reload
identically, merge gives back plain modules."""

import pytest
import torch
from adapter_helpers import batch, logits, make
from test_mora_archs import train

from tunelab.adapters import base, partial
from tunelab.models.tiny import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_trains_and_roundtrips(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = batch(t=12)
    model = make(arch)
    cfg = partial.FreezeConfig(layers=1, train_lm_head=True)
    report = partial.wrap(model, cfg)
    assert report.replaced and all(n.startswith("model.layers.1.") for n in report.replaced)
    assert "lm_head" in report.extras
    frozen = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    losses = train(model, ids, lr=1e-2)
    assert losses[-1] < losses[0] - 0.25, losses
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, frozen)
    want = logits(model, ids)

    model.save_pretrained(tmp_path / "hf")  # what a run writes to model/
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(hf, ids), want, atol=0, rtol=0)

    partial.export(model, cfg, tmp_path / "ad")
    back = make(arch)
    partial.load(back, tmp_path / "ad")
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)
    partial.merge(back)
    assert not base.has_adapter(back)
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)

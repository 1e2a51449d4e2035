"""Architecture matrix for QLoRA: every tiny architecture trains on an NF4 base and survives save → load → merge.

Loading re-quantises the float base (deterministic), so the reloaded model equals the trained one exactly;
merging dequantises into float weights, equal to the unmerged quantised model within fp tolerance.
"""

import pytest
import torch
from adapter_helpers import batch, logits, make
from test_lora_archs import train
from torch import nn

from tunelab.adapters import base, qlora
from tunelab.models.tiny import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_arch_trains_and_roundtrips(arch, tmp_path):
    ids = batch(t=12)
    model = make(arch)
    cfg = qlora.QLoraConfig(r=4, alpha=8)
    report = qlora.wrap(model, cfg)
    layers = [m for _, m in base.adapter_modules(model)]
    assert layers and all(isinstance(m, qlora.QLoraLinear) for m in layers)
    assert not any(n.endswith(".weight") and "lora_" not in n and any(n.startswith(r + ".") for r in report.replaced)
                   for n in model.state_dict())  # no float copy of a quantised weight left behind

    losses = train(model, ids, steps=8)
    assert losses[-1] < losses[0] - 0.25, losses
    want = logits(model, ids)

    qlora.export(model, cfg, tmp_path)
    back = make(arch)
    qlora.load(back, tmp_path)
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)

    qlora.merge(back)
    assert all(type(back.get_submodule(n)) is nn.Linear for n in report.replaced)
    torch.testing.assert_close(logits(back, ids), want, atol=1e-5, rtol=0)

"""Architecture matrix for DoRA: every tiny architecture trains and survives PEFT save → load → merge.

Targets are "all-linear" (per-architecture coverage documented in test_lora_archs.py); the losses must fall
clearly, a PEFT-format export must load back bit-identically, and merging must not change the outputs.
"""

import pytest
import torch
from adapter_helpers import batch, logits, make
from test_lora_archs import train
from torch import nn

from tunelab.adapters import base, dora
from tunelab.models.tiny import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_arch_trains_and_roundtrips(arch, tmp_path):
    ids = batch(t=12)
    model = make(arch)
    cfg = dora.DoraConfig(r=4, alpha=8)
    report = dora.wrap(model, cfg)
    assert report.replaced and all(isinstance(m, dora.DoraLinear) for _, m in base.adapter_modules(model))

    losses = train(model, ids, steps=8)
    assert losses[-1] < losses[0] - 0.25, losses
    want = logits(model, ids)

    dora.export(model, cfg, tmp_path)
    back = make(arch)
    dora.load(back, tmp_path)
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)

    dora.merge(back)
    assert all(type(back.get_submodule(n)) is nn.Linear for n in report.replaced)
    torch.testing.assert_close(logits(back, ids), want, atol=1e-5, rtol=0)

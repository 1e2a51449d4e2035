"""MoRA on every tiny architecture: trains, survives the tunelab format round trip, merges exactly."""

import pytest
import torch
from adapter_helpers import batch, logits, make, train

from tunelab.adapters import base, mora
from tunelab.models.tiny import ARCHS




@pytest.mark.parametrize("arch", ARCHS)
def test_arch_trains_roundtrips_and_merges(arch, tmp_path):
    ids = batch(t=12)
    model = make(arch)
    cfg = mora.MoraConfig(r=4, type="rotation" if arch != "phi3" else "sharing")
    report = mora.wrap(model, cfg)
    assert report.replaced and all(".layers." in n for n in report.replaced)
    losses = train(model, ids)
    assert losses[-1] < losses[0] - 0.25, losses
    want = logits(model, ids)

    mora.export(model, cfg, tmp_path)
    back = make(arch)
    mora.load(back, tmp_path)
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)

    mora.merge(back)
    assert not base.has_adapter(back)
    torch.testing.assert_close(logits(back, ids), want, atol=1e-5, rtol=0)

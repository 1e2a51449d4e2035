"""LoReFT on every tiny architecture: trains on prompt positions, save → load gives identical outputs."""

import pytest
import torch
from adapter_helpers import batch, logits, make

from tunelab.adapters import loreft
from tunelab.models.tiny import ARCHS
from tunelab.objectives.sft import SFT


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_trains_and_roundtrips(arch, tmp_path):
    ids = batch(t=12)
    B, T = ids.shape
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    loss_mask[:, 6:] = True  # 6 prompt tokens, 6 response tokens
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask,
         "position_ids": torch.arange(T).expand(B, T), "seq_ids": torch.zeros_like(ids)}
    model = make(arch)
    cfg = loreft.LoreftConfig(r=4, positions="f3+l3")
    loreft.wrap(model, cfg)
    objective = SFT()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(8):
        ls, n, _ = objective.loss(model, b)
        (ls / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(ls.detach() / n))
    model.eval()
    assert losses[-1] < losses[0] - 0.1, losses
    with loreft.batch_context(model, b):
        want = logits(model, ids)

    loreft.export(model, cfg, tmp_path)
    back = make(arch)
    loreft.load(back, tmp_path)
    with loreft.batch_context(back, b):
        torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)

"""Memory mode (`train.memory_mode`): rows one at a time + MLP checkpointing gives the same training step, and
selective checkpointing really keeps fewer activations."""

import pytest
import torch

from tests.train.test_loop import _examples
from tunelab.config import TrainConfig
from tunelab.data.batches import StaticBatches, split_rows
from tunelab.data.collate import collate
from tunelab.models.checkpointing import checkpoint_layers
from tunelab.objectives.logprobs import token_logprobs
from tunelab.objectives.sft import SFT
from tunelab.train.loop import fit


@pytest.mark.parametrize("packed", [False, True])
def test_memory_mode_gives_the_same_step(tiny, tmp_path, packed):
    examples = _examples(8)
    items = [examples[:3], examples[3:5], examples[5:]] if packed else examples
    batches = [collate(items, pad_id=0, packed=packed)]
    out = {}
    for mm in (False, True):
        model = tiny("llama")
        cfg = TrainConfig(max_steps=1, batch_size=len(items), optimizer="SGD", lr=1.0, max_grad_norm=None,
                          warmup_steps=0, scheduler="constant", memory_mode=mm)
        res = fit(model, SFT(), StaticBatches(lambda e: batches, 1), cfg, tmp_path / f"mm{mm}{packed}")
        out[mm] = (res.last_loss, torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert "forward" not in vars(model.model.layers[0].mlp)  # checkpointing undone after training
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-6)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-6)


def test_split_rows_trims_each_row_to_its_length():
    batch = collate(_examples(3), pad_id=0)  # lengths 6, 9, 12
    parts = split_rows(batch)
    assert [p["input_ids"].shape for p in parts] == [(1, 6), (1, 9), (1, 12)]
    for b, p in enumerate(parts):
        assert torch.equal(p["input_ids"][0], batch["input_ids"][b, :p["input_ids"].shape[1]])
        assert int(p["loss_mask"].sum()) == int(batch["loss_mask"][b].sum())
    packed = collate([_examples(3)], pad_id=0, packed=True)
    assert split_rows(packed)[0]["attention_mask"].shape == (1, 1, 27, 27)


def saved_bytes(fn) -> int:
    total = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("part", ["mlp", "attention", "layer"])
def test_selective_checkpointing_saves_less_and_computes_the_same(tiny, part):
    model = tiny("llama")
    batch = collate(_examples(4), pad_id=0)

    def step():
        model.zero_grad()
        (-token_logprobs(model, batch).sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    before, ref = saved_bytes(step), step()
    undo = checkpoint_layers(model, part)
    after, got = saved_bytes(step), step()
    undo()
    assert after < before
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

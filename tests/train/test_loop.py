"""The loop: loss normalisation across gradient accumulation, chunked loss, schedules, resume, atomicity."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import alpaca_rows, save_tiny_model, train_losses, write_config, write_jsonl
from tunelab.config import TrainConfig, load_config
from tunelab.data.collate import collate
from tunelab.data.masking import Encoded
from tunelab.objectives.logprobs import token_logprobs
from tunelab.objectives.sft import SFT
from tunelab.train import checkpoint as ckpt
from tunelab.data.batches import StaticBatches
from tunelab.train.loop import fit
from tunelab.train.optim import lr_lambda


def _examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 6 + 3 * i  # different lengths → different token counts per micro-batch
        ids = torch.randint(5, 900, (L,), generator=g).tolist()
        mask = [False] * 2 + [True] * (L - 2)
        out.append(Encoded(ids, mask, False, L - 2))
    return out


def test_chunked_logprobs_equal_plain_cross_entropy(tiny):
    model = tiny("llama")
    batch = collate(_examples(4), pad_id=0)
    lp = token_logprobs(model, batch, chunk_size=5)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    mask = batch["loss_mask"][:, 1:]
    assert torch.allclose(-lp[:, 1:][mask], ce[mask], atol=1e-5)
    assert float(lp[:, 1:][~mask].abs().sum()) == 0.0


def test_gradient_accumulation_equals_one_big_batch(tiny, tmp_path):
    examples = _examples(8)
    params = {}
    for accum, bs in ((4, 2), (1, 8)):
        model = tiny("llama")
        batches = [collate(examples[k:k + bs], pad_id=0) for k in range(0, 8, bs)]
        cfg = TrainConfig(max_steps=1, batch_size=bs, grad_accum=accum, optimizer="SGD", lr=1.0,
                          max_grad_norm=None, warmup_steps=0, scheduler="constant")
        fit(model, SFT(), StaticBatches(lambda e: batches, len(batches)), cfg, tmp_path / f"r{accum}")
        params[accum] = torch.cat([p.detach().flatten() for p in model.parameters()])
    base = torch.cat([p.detach().flatten() for p in tiny("llama").parameters()])
    assert (params[1] - base).abs().max() > 1e-4  # the step did something
    assert torch.allclose(params[4], params[1], atol=1e-6)


def test_mean_of_means_would_differ(tiny):
    """Guard that the data above really distinguishes token-normalisation from a mean of means."""
    examples = _examples(8)
    counts = [sum(e.loss_mask[1:]) for e in examples]
    assert len({sum(counts[k:k + 2]) for k in range(0, 8, 2)}) > 1


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warmup_and_decay(kind):
    f = lr_lambda(kind, total=100, warmup=10, min_ratio=0.1)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    end = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)), "linear": 0.1 + 0.9 / 90, "constant": 1.0}
    assert f(99) == pytest.approx(end[kind])


def _run_cfg(tmp_path, tokenizer, out, **train):
    model_dir = tmp_path / "tiny"
    if not model_dir.exists():
        save_tiny_model(model_dir, tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))
    cfg = write_config(tmp_path / f"{out}.yaml", output_dir=str(tmp_path / out), method="lora",
                       model={"name": str(model_dir)},
                       data={"train": str(data), "max_length": 96, "eval_max": 4},
                       lora={"r": 4, "dropout": 0.1},
                       train={"max_steps": 6, "batch_size": 2, "lr": 5e-3, "save_every": 2, "keep_last": 2, **train},
                       samples={"n_heldout": 0})
    return load_config(cfg)


def test_resume_reproduces_the_uninterrupted_curve(tmp_path, tokenizer):
    from tunelab.train.launch import train

    full = train(_run_cfg(tmp_path, tokenizer, "full"))
    cfg = _run_cfg(tmp_path, tokenizer, "cut")
    train(cfg, stop_after=3)  # "killed" after step 3; last checkpoint is step 2
    assert ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-000002"
    resumed = train(cfg)
    a, b = train_losses(full), train_losses(resumed)
    assert [s for s, _ in b] == list(range(1, 7))
    assert [l for _, l in a] == pytest.approx([l for _, l in b], abs=1e-6, rel=0)
    assert len(ckpt.complete_checkpoints(tmp_path / "cut" / "checkpoints")) == 2  # keep_last


def test_interrupted_save_leaves_previous_checkpoint_loadable(tiny, tmp_path, monkeypatch):
    model = tiny("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    d = tmp_path / "checkpoints"
    ckpt.save_checkpoint(d, 1, model, opt, sched, {"micro": 1, "tokens": 10}, keep_last=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt, "save_optimizer", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(d, 2, model, opt, sched, {"micro": 2, "tokens": 20}, keep_last=3)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(d)
    assert latest.name == "step-000001"
    assert not list(d.glob(".tmp-*"))  # cleaned up
    state = ckpt.load_checkpoint(latest, model, opt, sched)
    assert state["loop"]["micro"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_gradient_checkpointing_gives_the_same_step(tiny, tmp_path):
    examples = _examples(4)
    batches = [collate(examples, pad_id=0)]
    out = {}
    for gc in (False, True):
        model = tiny("llama")
        cfg = TrainConfig(max_steps=1, batch_size=4, optimizer="SGD", lr=1.0, max_grad_norm=None,
                          warmup_steps=0, scheduler="constant", gradient_checkpointing=gc)
        res = fit(model, SFT(), StaticBatches(lambda e: batches, 1), cfg, tmp_path / f"gc{gc}")
        out[gc] = (res.last_loss, torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-6)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-6)

"""Checkpoints are verified and pickle-free: a damaged newest checkpoint falls back to the previous intact one
(with a warning) instead of crashing the resume; optimizer state round-trips exactly through safetensors + JSON."""

import json

import pytest
import torch

from tests.helpers import alpaca_rows, save_tiny_model, train_losses, write_config, write_jsonl
from tunelab.config import load_config
from tunelab.train import checkpoint as ckpt
from tunelab.train.checkpoint_files import damage, load_optimizer, save_optimizer
from tunelab.train.launch import train


def _cfg(tmp_path, tokenizer, name, **train_opts):
    model_dir = tmp_path / "tiny"
    if not model_dir.exists():
        save_tiny_model(model_dir, tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))
    path = write_config(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), method="lora",
                        model={"name": str(model_dir)}, data={"train": str(data), "max_length": 96, "eval_max": 4},
                        lora={"r": 4, "dropout": 0.1},
                        train={"max_steps": 6, "batch_size": 2, "lr": 5e-3, "save_every": 2, "keep_last": 3,
                               **train_opts},
                        samples={"n_heldout": 0})
    return load_config(path)


def _stepped_optimizer(model, cls=torch.optim.AdamW, **kw):
    opt = cls([{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
               {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}], lr=1e-3, **kw)
    for _ in range(2):
        model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("cls,kw", [(torch.optim.AdamW, {"betas": (0.8, 0.95)}),
                                    (torch.optim.SGD, {"momentum": 0.9})])
def test_optimizer_state_round_trips_exactly_without_pickle(tiny, tmp_path, cls, kw):
    model = tiny("llama")
    sd = _stepped_optimizer(model, cls, **kw).state_dict()
    save_optimizer(sd, tmp_path)
    back = load_optimizer(tmp_path)
    assert back["param_groups"] == sd["param_groups"]  # tuples stay tuples (betas), ints stay ints
    assert type(back["param_groups"][0].get("betas", ())) is type(sd["param_groups"][0].get("betas", ()))
    assert back["state"].keys() == sd["state"].keys() and len(sd["state"]) > 0
    for i, state in sd["state"].items():
        assert state.keys() == back["state"][i].keys()
        for k, v in state.items():
            assert torch.is_tensor(v) and v.dtype == back["state"][i][k].dtype and torch.equal(v, back["state"][i][k])


def test_a_checkpoint_is_pickle_free_and_listed_in_its_manifest(tiny, tmp_path):
    model = tiny("llama")
    opt = _stepped_optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"micro": 3, "tokens": 9}, keep_last=2)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["COMPLETE", "manifest.json", "optimizer.json", "optimizer.safetensors", "rng.safetensors",
                     "state.json", "trainable.safetensors"]
    for p in path.iterdir():
        assert not p.read_bytes().startswith(b"\x80")  # no pickle stream (protocol 2+ starts with 0x80)
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(listed) == [n for n in names if n not in ("COMPLETE", "manifest.json")]
    assert damage(path) is None
    other = tiny("llama")
    opt2 = _stepped_optimizer(tiny("llama"))
    ckpt.load_checkpoint(path, other, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(v, opt2.state_dict()["state"][i][k]) for k, v in s.items())


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("harm", ["truncate", "flip", "delete", "no_manifest"])
def test_damage_is_named(tiny, tmp_path, harm):
    model = tiny("llama")
    opt = _stepped_optimizer(model)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                                {"micro": 1, "tokens": 1}, keep_last=2)
    target = path / "trainable.safetensors"
    if harm == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif harm == "flip":
        _flip_last_byte(target)
    elif harm == "delete":
        target.unlink()
    else:
        (path / "manifest.json").unlink()
    expected = {"truncate": "trainable.safetensors has 100 bytes", "flip": "does not match its checksum",
                "delete": "trainable.safetensors is missing", "no_manifest": "manifest.json is missing"}[harm]
    assert expected in damage(path)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tokenizer, capsys):
    full = train(_cfg(tmp_path, tokenizer, "full"))
    cfg = _cfg(tmp_path, tokenizer, "cut")
    out = train(cfg, stop_after=5)  # checkpoints 2 and 4
    newest = out / "checkpoints" / "step-000004" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # e.g. a copy cut short
    capsys.readouterr()
    train(cfg)
    err = " ".join(capsys.readouterr().err.split())
    assert "step-000004 is damaged (trainable.safetensors has" in err and "falling back to step-000002" in err
    assert (out / "checkpoints" / ".damaged-step-000004").is_dir()  # kept aside for inspection, not resumed
    assert train_losses(out) == train_losses(full)  # resumed at step 2: the same curve, exactly
    assert (out / "results.json").exists()


def test_fallback_skips_every_damaged_checkpoint(tiny, tmp_path, capsys):
    model = tiny("llama")
    opt = _stepped_optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    paths = [ckpt.save_checkpoint(tmp_path, s, model, opt, sched, {"micro": s, "tokens": 1}, keep_last=3)
             for s in (1, 2, 3)]
    _flip_last_byte(paths[2] / "state.json")
    (paths[1] / "rng.safetensors").write_bytes(b"")
    assert ckpt.latest_checkpoint(tmp_path) == paths[0]
    err = " ".join(capsys.readouterr().err.split())
    assert "step-000003 is damaged (state.json does not match its checksum)" in err
    assert "step-000002 is damaged (rng.safetensors has 0 bytes" in err
    _flip_last_byte(paths[0] / "optimizer.safetensors")
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert "no intact checkpoint is left: starting from step 0" in " ".join(capsys.readouterr().err.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".damaged-step-00000{i}" for i in (1, 2, 3)]

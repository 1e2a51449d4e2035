"""Atomic checkpoints and exact resume.

A checkpoint `checkpoints/step-000120/` holds everything needed to continue *exactly*:

    trainable.safetensors   the trainable tensors only (adapter weights, or all weights for full FT)
    optimizer.pt            optimizer state (tensors + numbers; loaded with weights_only=True)
    state.json              step, data position, scheduler state, tokens seen, Python/NumPy RNG
    rng.safetensors         torch CPU (and CUDA) RNG states
    objective.safetensors   the objective's own state, when it has any (a moving DPO reference)
    source.safetensors      the batch source's tensors, when it has any (the current rollout round)
    COMPLETE                written last

It is written into a temporary `.tmp-…` folder and renamed into place, so a process killed at any moment
leaves the previous checkpoint intact; folders without `COMPLETE` are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, sd: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in sd if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint has tensors the model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, t in sd.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    np_state = np.random.get_state()
    py = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
          "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, py


def _set_rng(tensors: dict, py: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = py["python"]
    random.setstate((v, tuple(state), gauss))
    n = py["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, loop_state: dict, keep_last: int,
                    objective_state: dict[str, torch.Tensor] | None = None) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng_t, rng_py = _rng_state()
    save_file(rng_t, str(tmp / "rng.safetensors"))
    if objective_state:
        save_file({k: v.detach().contiguous().cpu() for k, v in objective_state.items()},
                  str(tmp / "objective.safetensors"))
    source = loop_state.get("source") or {}
    if source.get("tensors"):  # a batch source's tensors (a rollout round) go to their own safetensors file
        save_file({k: v.detach().contiguous().cpu() for k, v in source["tensors"].items()},
                  str(tmp / "source.safetensors"))
        loop_state = {**loop_state, "source": {k: v for k, v in source.items() if k != "tensors"}}
    state = {"step": step, "loop": loop_state, "scheduler": scheduler.state_dict(), "rng": rng_py}
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "COMPLETE").write_text("ok\n")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.name.startswith("step-") and (p / "COMPLETE").exists())


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = complete_checkpoints(ckpt_dir)
    for tmp in ckpt_dir.glob(".tmp-*") if ckpt_dir.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that was interrupted
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scheduler, objective=None) -> dict:
    """Restore model, optimizer, scheduler, RNGs (and `objective`'s own state) in place; returns state.json."""
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    if objective is not None and hasattr(objective, "load_state_dict"):
        saved = path / "objective.safetensors"
        objective.load_state_dict(load_file(str(saved)) if saved.exists() else {})
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    _set_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    if (path / "source.safetensors").exists():
        state["loop"]["source"]["tensors"] = load_file(str(path / "source.safetensors"))
    return state

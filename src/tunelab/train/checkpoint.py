"""Atomic, verified checkpoints and exact resume.

A checkpoint `checkpoints/step-000120/` holds everything needed to continue *exactly*:

    trainable.safetensors   the trainable tensors only (adapter weights, or all weights for full FT)
    optimizer.safetensors   optimizer state tensors, + optimizer.json: its structure (param groups, step
                            counts, non-tensor values) — no pickle anywhere (`checkpoint_files.py`)
    state.json              step, data position, scheduler state, tokens seen, Python/NumPy RNG
    rng.safetensors         torch CPU (and CUDA) RNG states
    objective.safetensors   the objective's own state, when it has any (a moving DPO reference)
    source.safetensors      the batch source's tensors, when it has any (the current rollout round)
    manifest.json           size + SHA-256 of every file above, written just before COMPLETE
    COMPLETE                written last

It is written into a temporary `.tmp-…` folder and renamed into place, so a process killed at any moment
leaves the previous checkpoint intact; folders without `COMPLETE` are ignored and cleaned up. A write that
fails (a full disk) removes its temporary folder and stops with one line; the previous checkpoints stay.
Only after the new checkpoint is complete are checkpoints beyond the newest `keep_last` deleted, so the
newest one always survives pruning; the loop prunes one step later still (`keep_last=None` here, then
`prune_checkpoints` once the next step's loss was judged healthy), so a divergence that shows in the loss
right after a checkpoint still finds an older, good one.

Resuming verifies the newest checkpoint against its manifest; a damaged one (truncated, altered, written by
a tunelab without manifests) is moved aside to `.damaged-step-…` with a warning and the next older intact
one is used — a damaged latest checkpoint never blocks resuming. Weights with NaN/inf are never written.
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

from ..console import console
from ..errors import TunelabError
from .checkpoint_files import damage, load_optimizer, save_optimizer, write_manifest
from .guards import check_finite, disk_full, is_disk_full, tensor_bytes


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, sd: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Copy a checkpoint's trainable tensors into `model`; a checkpoint of another model or adapter shape (a
    `train.resume_from` of an incompatible run) is one line naming the first tensor that does not fit."""
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    unknown = [n for n in sd if n not in params]
    if unknown:
        raise TunelabError(f"{where}: holds tensor '{unknown[0]}', which this run's model lacks ({len(unknown)} "
                           "such) — another model, method or target_modules")
    absent = [n for n in trainable if n not in sd]
    if absent:
        raise TunelabError(f"{where}: lacks this run's trainable tensor '{absent[0]}' ({len(absent)} such) — "
                           "another method or target_modules")
    for n, t in sd.items():
        if tuple(t.shape) != tuple(params[n].shape):
            raise TunelabError(f"{where}: tensor '{n}' has shape {tuple(t.shape)}, this run's has "
                               f"{tuple(params[n].shape)} — another rank or model")
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


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, loop_state: dict, keep_last: int | None,
                    objective_state: dict[str, torch.Tensor] | None = None) -> Path:
    trainable = trainable_state(model)
    final = ckpt_dir / f"step-{step:06d}"
    check_finite(trainable.items(), f"checkpoint {final.name}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(tmp, step, trainable, optimizer, scheduler, loop_state, objective_state)
        write_manifest(tmp)
        (tmp / "COMPLETE").write_text("ok\n")
        _fsync_dir(tmp)
    except BaseException as e:  # interrupted or failed: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            opt_tensors = [t for s in optimizer.state.values() for t in s.values()]
            needed = tensor_bytes([*trainable.values(), *opt_tensors, *(objective_state or {}).values()])
            raise disk_full(f"checkpoint {final.name}", ckpt_dir, needed,
                            "the partial checkpoint was removed, earlier checkpoints are kept") from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    if keep_last is not None:
        prune_checkpoints(ckpt_dir, keep_last)
    return final


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (the newest is never deleted)."""
    for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _write(tmp: Path, step: int, trainable: dict, optimizer, scheduler, loop_state: dict,
           objective_state: dict[str, torch.Tensor] | None) -> None:
    save_file(trainable, str(tmp / "trainable.safetensors"))
    save_optimizer(optimizer.state_dict(), tmp)
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
    """The newest intact checkpoint; damaged newer ones are moved aside (with a warning), interrupted saves
    removed."""
    for tmp in ckpt_dir.glob(".tmp-*") if ckpt_dir.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that was interrupted
    done = complete_checkpoints(ckpt_dir)
    while done:
        newest = done.pop()
        problem = damage(newest)
        if problem is None:
            return newest
        aside = ckpt_dir / f".damaged-{newest.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(newest, aside)
        fallback = f"falling back to {done[-1].name}" if done else "no intact checkpoint is left: starting from step 0"
        console.print(f"warning: checkpoint {newest} is damaged ({problem}); moved it to {aside.name}; {fallback}",
                      style="yellow", markup=False, soft_wrap=True)  # one line, however long the path
    return None


def load_checkpoint(path: Path, model, optimizer, scheduler, objective=None) -> dict:
    """Restore model, optimizer, scheduler, RNGs (and `objective`'s own state) in place; returns state.json."""
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")), str(path))
    if objective is not None and hasattr(objective, "load_state_dict"):
        saved = path / "objective.safetensors"
        objective.load_state_dict(load_file(str(saved)) if saved.exists() else {})
    optimizer.load_state_dict(load_optimizer(path))
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    _set_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    if (path / "source.safetensors").exists():
        state["loop"]["source"]["tensors"] = load_file(str(path / "source.safetensors"))
    return state

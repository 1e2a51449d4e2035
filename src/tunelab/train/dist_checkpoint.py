"""Checkpoints of a distributed run: sharded with `torch.distributed.checkpoint` (DCP), resumable at any world size.

A distributed run's checkpoint `checkpoints/step-000120/` holds

    dcp/shard-0000R-model-00001-of-00001.safetensors   each rank's shards of the trainable tensors and their
                                                       optimizer state (DCP, HuggingFace safetensors storage)
    state.json              step, data position, scheduler, world size, Python/NumPy RNG (rank 0)
    rng-R.safetensors       each rank's torch RNG states
    objective.safetensors   the objective's own state (rank 0), as in a single-process checkpoint
    source-R.json / .safetensors   each rank's batch-source state (its share of a rollout round)
    COMPLETE                written last, after every rank has written its part; then renamed into place

Why DCP with safetensors storage: every rank writes only its own shards (what matters for full finetuning of a
large model under FSDP2), and DCP re-shards on load, so a checkpoint saved at 2 ranks resumes at 1 or 4.
PyTorch's default DCP storage (`FileSystemWriter`) pickles its `.metadata` file and loads it with
`pickle.load` (and non-tensor entries with `torch.load(weights_only=False)`) — arbitrary objects on load,
which tunelab does not accept. The `HuggingFaceStorageWriter/Reader` pair writes plain safetensors files whose
headers carry each shard's offsets as JSON, and reads the layout back from those headers: nothing is unpickled.
It stores tensors only: the optimizer's param-group numbers (the scheduled ``lr`` above all — a scheduler's
state alone does not put it back) and everything else go to ``state.json``.

Only the trainable tensors are saved (adapter weights, or all weights for full finetuning), under the model's
own parameter names — the same names with or without DDP/FSDP2, which is what makes world sizes interchangeable.
A single-process checkpoint (`train/checkpoint.py`) also resumes under DDP/FSDP2 (`load`, full state dicts
distributed by `set_state_dict`); a sharded one resumes in a single process through the same DCP reader.
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

from ..errors import TunelabError
from .checkpoint import complete_checkpoints


def is_sharded(path: Path) -> bool:
    return (path / "dcp").is_dir()


def _options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, strict=False)


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _flat(model, optimizer) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, {flat key: tensor}) — the flat dict shares its tensors with the others."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options())
    keep = _trainable_names(model)
    msd = {k: v for k, v in msd.items() if k in keep}
    flat = {f"model.{k}": v for k, v in msd.items()}
    for name, st in osd["state"].items():
        flat.update({f"optim.{name}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return msd, osd, flat


def _rng() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    st = np.random.get_state()
    return tensors, {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                     "numpy": [st[0], st[1].tolist(), *st[2:]]}


def _set_rng(path: Path, rank: int, py: dict | None) -> None:
    mine = path / f"rng-{rank}.safetensors"
    tensors = load_file(str(mine if mine.exists() else path / "rng-0.safetensors" if (path / "rng-0.safetensors")
                            .exists() else path / "rng.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    if py:
        v, state, gauss = py["python"]
        random.setstate((v, tuple(state), gauss))
        n = py["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def save(ckpt_dir: Path, step: int, model, optimizer, scheduler, loop_state: dict, keep_last: int,
         objective_state: dict | None, engine) -> Path:
    """Every rank calls this (DCP's save is collective); rank 0 writes the metadata and renames into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    final, tmp = ckpt_dir / f"step-{step:06d}", ckpt_dir / f".tmp-step-{step:06d}"
    if engine.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine_barrier(engine)
    _, _, flat = _flat(model, optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True))
    rng_t, rng_py = _rng()
    save_file(rng_t, str(tmp / f"rng-{engine.rank}.safetensors"))
    source = dict(loop_state.get("source") or {})
    tensors = source.pop("tensors", None)
    if tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / f"source-{engine.rank}.safetensors"))
    (tmp / f"source-{engine.rank}.json").write_text(json.dumps(source))
    engine_barrier(engine)
    if engine.rank == 0:
        if objective_state:
            save_file({k: _full(v).contiguous().cpu() for k, v in objective_state.items()},
                      str(tmp / "objective.safetensors"))
        loop = {k: v for k, v in loop_state.items() if k != "source"}
        groups = [{k: v for k, v in g.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                  for g in optimizer.param_groups]
        state = {"step": step, "loop": loop, "scheduler": scheduler.state_dict(), "rng": rng_py,
                 "world": engine.world, "param_groups": groups}
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / "COMPLETE").write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    engine_barrier(engine)
    return final


def engine_barrier(engine) -> None:
    if engine.distributed:
        torch.distributed.barrier()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def load(path: Path, model, optimizer, scheduler, objective, engine) -> dict:
    """Restore a sharded (any world size) or single-process checkpoint into this process's model, optimizer,
    scheduler, RNG and objective; returns state.json with the loop's position (``loop.source`` is this rank's)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = json.loads((path / "state.json").read_text())
    saved_world = state.get("world", 1)
    if is_sharded(path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        msd, osd, flat = _flat(model, optimizer)
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / "dcp")))
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_options())
        for group, saved in zip(optimizer.param_groups, state["param_groups"]):
            group.update(saved)
    else:  # a single-process checkpoint: full tensors, every rank reads them and keeps its shard
        msd = load_file(str(path / "trainable.safetensors"))
        osd = _single_optimizer_state(path, model, optimizer)
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_options(full=True))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng(path, engine.rank, state.get("rng"))
    if objective is not None and hasattr(objective, "load_state_dict"):
        saved = path / "objective.safetensors"
        objective.load_state_dict(load_file(str(saved)) if saved.exists() else {})
    state["loop"]["source"] = _source_state(path, state, saved_world, engine)
    return state


def _source_state(path: Path, state: dict, saved_world: int, engine) -> dict:
    if not is_sharded(path):  # single-process layout (train/checkpoint.py)
        source = state["loop"].get("source") or {}
        if (path / "source.safetensors").exists():
            source["tensors"] = load_file(str(path / "source.safetensors"))
        per_rank = [source] if source else []
    else:
        per_rank = []
        for r in range(saved_world):
            s = json.loads((path / f"source-{r}.json").read_text())
            if (path / f"source-{r}.safetensors").exists():
                s["tensors"] = load_file(str(path / f"source-{r}.safetensors"))
            per_rank.append(s)
    if any(s for s in per_rank) and saved_world != engine.world:
        raise TunelabError(f"this online RL checkpoint holds {saved_world} ranks' rollouts; resume it with "
                           f"{saved_world} ranks (torchrun --nproc-per-node {saved_world})")
    return per_rank[engine.rank] if per_rank else {}


def _single_optimizer_state(path: Path, model, optimizer) -> dict:
    """A single-process optimizer state (keyed by parameter index) keyed by parameter name instead.

    Indices follow `optimizer.param_groups`, which `train.optim.build_optimizer` fills in the model's parameter
    order — the same order in one process and under DDP/FSDP2, so index i names the same parameter."""
    saved = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: st for i, st in saved["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}

"""Checkpoints of a distributed run: sharded with `torch.distributed.checkpoint` (DCP), resumable at any world size.

A distributed run's checkpoint `checkpoints/step-000120/` holds

    dcp/shard-0000R-model-00001-of-00001.safetensors   each rank's shards of the trainable tensors and their
                                                       optimizer state (DCP, HuggingFace safetensors storage)
    state.json              step, data position, scheduler, world size, Python/NumPy RNG (rank 0)
    rng-R.safetensors       each rank's torch RNG states
    objective.safetensors   the objective's own state (rank 0), as in a single-process checkpoint
    source-R.json / .safetensors   each rank's batch-source state (its share of a rollout round)
    manifest.json           size + SHA-256 of every file above (`dcp/…` included), as in a single-process
                            checkpoint: each rank hashes the files it wrote, rank 0 merges them and hashes the rest
    COMPLETE                written last, after every rank has written its part; then renamed into place

On resume rank 0 alone verifies the newest checkpoint against its manifest (`latest`): a damaged one — a
truncated or altered shard — is moved aside to `.damaged-step-…` and the next intact one is used, exactly as in
one process, and every rank is then told which step to load. Pruning beyond `keep_last` is the loop's (rank 0
deletes, one step after the save, once that step's loss was judged healthy).

Why DCP with safetensors storage: every rank writes only its own shards (what matters for full finetuning of a
large model under FSDP2), and DCP re-shards on load, so a checkpoint saved at 2 ranks resumes at 1 or 4.
PyTorch's default DCP storage (`FileSystemWriter`) serialises its `.metadata` file and non-tensor entries with
Python's pickle, which can run arbitrary code when read back — tunelab does not accept that. The `HuggingFaceStorageWriter/Reader` pair writes plain safetensors files whose
headers carry each shard's offsets as JSON, and reads the layout back from those headers: nothing is unpickled.
It stores tensors only: the optimizer's param-group numbers (the scheduled ``lr`` above all — a scheduler's
state alone does not put it back) and everything else go to ``state.json``.

Only the trainable tensors are saved (adapter weights, or all weights for full finetuning), under the model's
own parameter names — the same names with or without DDP/FSDP2, which is what makes world sizes interchangeable.
A single-process checkpoint (`train/checkpoint.py`: optimizer state in `optimizer.safetensors` + `optimizer.json`)
also resumes under DDP/FSDP2 (`load`, full state dicts distributed by `set_state_dict`); a sharded one resumes in
a single process through the same DCP reader.
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
from .checkpoint import latest_checkpoint
from .checkpoint_files import hash_files, load_optimizer, write_manifest
from .guards import check_finite, disk_full, is_disk_full, tensor_bytes


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


def latest(ckpt_dir: Path, engine) -> Path | None:
    """`checkpoint.latest_checkpoint` under torchrun: rank 0 alone verifies the manifests, moves damaged
    checkpoints aside and removes interrupted saves (one process renaming, not N racing), then tells every rank
    which step to load."""
    if not engine.distributed:
        return latest_checkpoint(ckpt_dir)
    found = latest_checkpoint(ckpt_dir) if engine.rank == 0 else None
    step = engine.from_main(int(found.name.split("-")[1]) if found is not None else -1)
    return None if step < 0 else ckpt_dir / f"step-{step:06d}"


def _own_files(tmp: Path, rank: int) -> list[Path]:
    """The files this rank wrote into a checkpoint: its RNG, its source state, its DCP shards."""
    mine = [tmp / f"rng-{rank}.safetensors", tmp / f"source-{rank}.json", tmp / f"source-{rank}.safetensors"]
    # DCP's HF writer numbers the ranks' files from 1 (`shard-0000{R+1}-…`); whatever this misses, rank 0 hashes
    shards = sorted((tmp / "dcp").glob(f"shard-{rank + 1:05d}-*")) if (tmp / "dcp").is_dir() else []
    return [p for p in mine if p.exists()] + shards


def _check_finite(flat: dict, name: str, engine) -> None:
    """No rank writes NaN/inf weights, and every rank stops together when one of them holds some."""
    local = [(k, v.to_local() if hasattr(v, "to_local") else v) for k, v in flat.items() if k.startswith("model.")]
    try:
        check_finite(local, f"checkpoint {name}")
        problem = None
    except TunelabError as e:
        problem = e
    bad = engine.max_int(engine.rank + 1 if problem else 0)
    if problem:
        raise problem
    if bad:
        raise TunelabError(f"refusing to write checkpoint {name}: rank {bad - 1}'s weights hold NaN or infinite "
                           "values (the training diverged; lower train.lr)")


def save(ckpt_dir: Path, step: int, model, optimizer, scheduler, loop_state: dict, objective_state: dict | None,
         engine) -> Path:
    """Every rank calls this (DCP's save is collective); rank 0 writes the metadata and the manifest, then
    renames into place. Pruning old checkpoints is the loop's (rank 0, one step later, as for one process).
    A rank that fails to write its part (a full disk) makes every rank stop with one line, none waits."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    final, tmp = ckpt_dir / f"step-{step:06d}", ckpt_dir / f".tmp-step-{step:06d}"
    if engine.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine_barrier(engine)
    _, _, flat = _flat(model, optimizer)
    _check_finite(flat, final.name, engine)
    failure = None
    try:
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True))
        rng_t, rng_py = _rng()
        save_file(rng_t, str(tmp / f"rng-{engine.rank}.safetensors"))
        source = dict(loop_state.get("source") or {})
        tensors = source.pop("tensors", None)
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(tmp / f"source-{engine.rank}.safetensors"))
        (tmp / f"source-{engine.rank}.json").write_text(json.dumps(source))
        # each rank hashes what it wrote (in parallel); rank 0 merges the parts into manifest.json
        (tmp / f"manifest-{engine.rank}.part").write_text(json.dumps(hash_files(tmp, _own_files(tmp, engine.rank))))
    except Exception as e:  # noqa: BLE001 — decided collectively below
        failure = e
    engine_barrier(engine)
    if engine.rank == 0 and failure is None:
        try:
            if objective_state:
                save_file({k: _full(v).contiguous().cpu() for k, v in objective_state.items()},
                          str(tmp / "objective.safetensors"))
            loop = {k: v for k, v in loop_state.items() if k != "source"}
            groups = [{k: v for k, v in g.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                      for g in optimizer.param_groups]
            state = {"step": step, "loop": loop, "scheduler": scheduler.state_dict(), "rng": rng_py,
                     "world": engine.world, "param_groups": groups}
            (tmp / "state.json").write_text(json.dumps(state))
            known: dict = {}
            for part in sorted(tmp.glob("manifest-*.part")):
                known.update(json.loads(part.read_text()))
                part.unlink()
            write_manifest(tmp, known)  # rank 0 hashes the rest (its own files, anything DCP added)
            (tmp / "COMPLETE").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except Exception as e:  # noqa: BLE001
            failure = e
    bad = engine.max_int(engine.rank + 1 if failure is not None else 0)
    if bad:
        if engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays; earlier checkpoints do
        if failure is None:
            raise TunelabError(f"checkpoint {final.name}: rank {bad - 1} could not write its part; the partial "
                               "checkpoint was removed, earlier checkpoints are kept")
        if isinstance(failure, TunelabError):
            raise failure
        if is_disk_full(failure):
            raise disk_full(f"checkpoint {final.name}", ckpt_dir, tensor_bytes(_local(v) for v in flat.values()),
                            "the partial checkpoint was removed, earlier checkpoints are kept") from None
        raise failure
    return final


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


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
    saved = load_optimizer(path)  # optimizer.safetensors + optimizer.json (`checkpoint_files`): no pickle
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: st for i, st in saved["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}

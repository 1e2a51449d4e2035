"""The files of one checkpoint folder: the integrity manifest, and optimizer state without pickle.

    manifest.json        {"files": {name: {"bytes": N, "sha256": hex}}} for every other file of the folder
                         (and of its sub-folders: a distributed run's `dcp/` shards, named `dcp/…`),
                         written just before COMPLETE and checked before a checkpoint is resumed from: a
                         truncated, bit-flipped or missing file makes the checkpoint "damaged" and the run
                         falls back to the newest intact one
    optimizer.safetensors + optimizer.json
                         `optimizer.state_dict()` split in two: every tensor (moments, step counts) in the
                         safetensors file, the structure (param groups, per-parameter state keys, any
                         non-tensor value, tuples vs lists, int keys) in the JSON — so nothing is pickled
                         and loading it back gives the identical state dict (bit-exact resume)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
_UNHASHED = {MANIFEST, "COMPLETE"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_files(folder: Path, paths) -> dict:
    """{name relative to `folder`: {"bytes", "sha256"}} of `paths` — one rank's share of a sharded checkpoint."""
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in paths}


def write_manifest(folder: Path, known: dict | None = None) -> None:
    """The manifest of every file under `folder` (sub-folders too: a sharded checkpoint's `dcp/`); `known`:
    entries already hashed elsewhere (by the rank that wrote them), the rest are hashed here."""
    files = dict(known or {})
    rest = [p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in files
            and p.relative_to(folder).as_posix() not in _UNHASHED]
    files.update(hash_files(folder, rest))
    (folder / MANIFEST).write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1))


def damage(folder: Path) -> str | None:
    """None when every file the manifest lists is there with its size and hash, else what is wrong."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, {want['bytes']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _encode(value, key: str, tensors: dict):
    """A JSON-able tagged tree of `value`; tensors go to `tensors` under their path `key`."""
    if torch.is_tensor(value):
        tensors[key] = value.detach().contiguous().cpu()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        tag = "tuple" if isinstance(value, tuple) else "list"
        return {tag: [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"optimizer state value at {key} has unsupported type {type(value).__name__}")


def _decode(node, tensors: dict):
    (tag, body), = node.items()
    if tag == "tensor":
        return tensors[body]
    if tag == "dict":
        return {k: _decode(v, tensors) for k, v in body}
    if tag in ("list", "tuple"):
        items = [_decode(v, tensors) for v in body]
        return tuple(items) if tag == "tuple" else items
    return body


def save_optimizer(state_dict: dict, folder: Path) -> None:
    tensors: dict = {}
    structure = _encode(state_dict, "optim", tensors)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps(structure))


def load_optimizer(folder: Path) -> dict:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    return _decode(json.loads((folder / "optimizer.json").read_text()), tensors)

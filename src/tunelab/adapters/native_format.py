"""tunelab's own adapter format, for methods PEFT does not have (MoRA, LoReFT) and for partial finetuning's
compact copy (freeze). The one module that writes and reads it.

A folder with two files, no pickle:

* `tunelab_adapter.json`: ``{"format": "tunelab-adapter", "version": 1, "method": <name>,
  "base_model_name_or_path": <hub id or folder, or null>, ...the method's own fields}``. Each method documents
  its fields in its `export` (mora: `config`, `modules`, `modules_to_save`; loreft: `config`, `hidden_size`;
  freeze: `modules`, `ensure_weight_tying`);
* `adapter_model.safetensors`: the method's tensors under module-path keys (``model.layers.3.mlp.up_proj.mora_M``),
  every tensor an independent contiguous CPU copy (safetensors refuses shared memory); the file's metadata holds
  ``{"format": "pt", "method": <name>}``.

    save_native(path, "mora", {"config": ..., "modules": ...}, tensors, base_model_name_or_path="...")
    meta, tensors = load_native(path, "mora")   # TunelabError naming the folder if it is anything else
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import TunelabError

CONFIG_FILE = "tunelab_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "tunelab-adapter"
VERSION = 1


def base_model_name(model: nn.Module, given: str | None = None) -> str | None:
    """`given`, else the name/folder the model was loaded from (`config._name_or_path`), else None."""
    if given is not None:
        return given
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def save_native(path: str | Path, method: str, fields: dict, tensors: dict[str, torch.Tensor],
                base_model_name_or_path: str | None = None) -> Path:
    """Write folder `path` (created if needed): the JSON header + `fields`, and `tensors` as safetensors."""
    reserved = {"format", "version", "method", "base_model_name_or_path"} & set(fields)
    if reserved:
        raise ValueError(f"save_native: field '{sorted(reserved)[0]}' is reserved for the format's header")
    meta = {"format": FORMAT, "version": VERSION, "method": method,
            "base_model_name_or_path": base_model_name_or_path, **fields}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    copies = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    save_file(copies, str(path / WEIGHTS_FILE), metadata={"format": "pt", "method": method})
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_native(path: str | Path, method: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of the folder `save_native` wrote for `method`; a TunelabError otherwise."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise TunelabError(f"{path}: not a tunelab {method} adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise TunelabError(f"{cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format", FORMAT) != FORMAT:
        raise TunelabError(f"{cfg_file}: not a tunelab adapter header (format '{FORMAT}' expected)")
    version = meta.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise TunelabError(f"{cfg_file}: format version {version!r} is not one this tunelab reads ({VERSION})")
    if meta.get("method") != method:
        raise TunelabError(f"{cfg_file}: holds a '{meta.get('method')}' adapter, not {method}")
    return meta, load_file(str(weights))

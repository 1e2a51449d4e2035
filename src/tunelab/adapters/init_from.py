"""Initialise a freshly wrapped adapter from a saved one (``lora.init_from``; dora, qlora, mora, loreft alike).

    lora:
      r: 8
      init_from: runs/sft          # a tunelab run folder, its adapter/ folder, or any PEFT LoRA adapter folder
                                   # (mora, loreft: a run or adapter folder of the same method, tunelab's format)

The run wraps the model as its own config says (`apply_method`), then copies the saved adapter's tensors into the
new layers: the run starts, at step 0 with a fresh optimizer and schedule, from the saved adapter's function
instead of LoRA's B = 0 (ΔW = s·BA of the saved adapter exactly, so the first forward equals the saved run's
final model). It is not a resume: nothing of the saved run's optimizer, step or data position is used (for that:
``train.resume_from``).

The saved adapter must have the shape this config builds: the same adapted modules (`target_modules`,
`modules_to_save`), the same rank per module, and — read from a PEFT adapter_config.json — the same scale
(`lora_alpha`, `use_rslora`), since equal tensors under another scale are another function. The first
difference is one line naming it (`lora.init_from runs/sft: rank 4 at model.layers.0.self_attn.q_proj in the
adapter, 8 in this run (lora.r / rank_pattern)`). Files are read as `peft_format.read_peft` reads them:
safetensors only, PEFT's LORA type.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import TunelabError
from . import base
from .native_format import CONFIG_FILE as NATIVE_CONFIG
from .native_format import load_native
from .peft_format import CONFIG_FILE, read_peft, untied_keys


def _is_adapter(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or (folder / NATIVE_CONFIG).is_file()


def adapter_folder(path: str | Path, key: str) -> Path:
    """The adapter folder `path` names: itself, or a run folder's `adapter/`."""
    path = Path(path)
    if _is_adapter(path):
        return path
    if _is_adapter(path / "adapter"):
        return path / "adapter"
    if (path / "model").is_dir():
        raise TunelabError(f"{key} {path}: holds a fully trained model (model/), not an adapter; train from it with "
                           f"model.name={path / 'model'}")
    if not path.exists():
        raise TunelabError(f"{key}: {path} does not exist")
    raise TunelabError(f"{key} {path}: no {CONFIG_FILE} or {NATIVE_CONFIG} there or in {path / 'adapter'}; not an "
                       "adapter folder (as tunelab or PEFT save one)")


def _read(folder: Path, method: str, where: str) -> tuple[dict, dict]:
    """(PEFT config or {}, tensors keyed like `base.adapter_state_dict`) of the adapter in `folder`."""
    module = base.get_method(method)
    if (folder / NATIVE_CONFIG).is_file():  # mora, loreft: tunelab's own format, written for this method only
        _, tensors = load_native(folder, method)
        derived = tuple(getattr(module, "DERIVED_SUFFIXES", ()))  # written for readers, not loaded (LoReFT's R)
        return {}, {k: t for k, t in tensors.items() if not (derived and k.endswith(derived))}
    if not hasattr(module, "PEFT_SUFFIXES"):
        raise TunelabError(f"{where}: holds a PEFT LoRA adapter; this run's method is {method}")
    return read_peft(folder)


def _module(key: str) -> str:
    """The module a tensor key belongs to: `….q_proj` of `….q_proj.lora_A.weight`, `lm_head` of `lm_head.weight`."""
    return key.split(".lora_")[0] if ".lora_" in key else key.rpartition(".")[0]


def _check_scale(model: nn.Module, conf: dict, method: str, where: str) -> None:
    """The saved adapter's scale (lora_alpha, use_rslora) against the layers this run built."""
    layers = [m for _, m in base.adapter_modules(model) if hasattr(m, "scaling")]
    if not layers:
        return
    if bool(conf.get("use_rslora", False)) != bool(layers[0].use_rslora):
        raise TunelabError(f"{where}: the adapter has use_rslora={bool(conf.get('use_rslora', False))}, this run "
                           f"{method}.use_rslora={bool(layers[0].use_rslora)}")
    alpha = conf.get("lora_alpha")
    built = {float(m.alpha) for m in layers}
    if alpha is not None and not conf.get("alpha_pattern") and len(built) == 1 and float(alpha) not in built:
        raise TunelabError(f"{where}: the adapter has lora_alpha={alpha:g}, this run {method}.alpha="
                           f"{built.pop():g} (the same tensors would be scaled differently)")


def init_adapter(model: nn.Module, method: str, path: str | Path) -> str:
    """Load the adapter saved at `path` into `model`, already wrapped with `method`; returns a note for the report."""
    key = f"{method}.init_from"
    folder = adapter_folder(path, key)
    where = f"{key} {path}"
    try:
        conf, tensors = _read(folder, method, where)
    except TunelabError as e:
        raise TunelabError(str(e) if str(e).startswith(key) else f"{key}: {e}") from None
    if conf and bool(conf.get("use_dora")) != any(k.endswith("lora_magnitude_vector") for k in base.adapter_parameters(model)):
        kind = "a DoRA" if conf.get("use_dora") else "a plain LoRA"
        raise TunelabError(f"{where}: holds {kind} adapter; this run's method is {method}")
    _check_scale(model, conf, method, where)
    sd = untied_keys(model, tensors, where)
    params = base.adapter_parameters(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # name the first in model order
    for k in sorted(sd, key=lambda k: order.get(_module(k), len(order))):
        if k not in params:
            raise TunelabError(f"{where}: the adapter trains {_module(k)}, which this run's {method}.target_modules / "
                               "modules_to_save do not select")
    for k in params:
        if k not in sd:
            raise TunelabError(f"{where}: this run's {method}.target_modules / modules_to_save select "
                               f"{_module(k)}, which the adapter does not train")
    for k in params:
        t, want = sd[k], tuple(params[k].shape)
        if tuple(t.shape) == want:
            continue
        if k.endswith("lora_A.weight"):
            raise TunelabError(f"{where}: rank {t.shape[0]} at {_module(k)} in the adapter, {want[0]} in this run "
                               f"({method}.r / rank_pattern)")
        raise TunelabError(f"{where}: '{k}' has shape {tuple(t.shape)} in the adapter, {want} in this run "
                           f"(another {method}.r or base model?)")
    base.load_adapter_state_dict(model, sd, source=where)
    return f"initialised from the adapter in {folder}"

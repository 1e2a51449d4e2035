"""The uniform adapter interface, the helpers every method shares, and the calls a run makes.

An *adapter method* (full, LoRA, DoRA, MoRA, LoReFT, QLoRA, freeze…) is one module in this package exposing::

    Config                                   # pydantic model of the method's settings
    wrap(model, cfg) -> AdapterReport         # swap target modules for adapter modules, freeze the base
    merge(model) -> list[str]                 # fold the update into base weights, restore plain modules
    adapter_state_dict(model) -> dict         # trainable adapter tensors only, our own key names
    load_adapter_state_dict(model, sd)
    set_enabled(model, flag) / disabled(model)  # run the frozen base model (e.g. the DPO reference)
    export(model, cfg, path, base_model_name_or_path=None)  # PEFT's format where PEFT has the method,
                                             # tunelab's own (native_format.py) otherwise
    load(model, path) -> AdapterReport        # wrap `model` like the saved adapter and load its tensors
    SAVES_FULL_MODEL = True     (optional)   # a run saves the whole HF model (full, freeze), not `export`
    check_examples(examples)    (optional)   # refuse encoded data the method cannot train on, before a run
    batch_context(model, batch) (optional)   # context manager around a scoring forward that needs to see the
                                             # batch (LoReFT: which prompt positions to intervene)

What a run calls (by method name, so no caller special-cases a method): `apply_method`, `check_method_data`,
`saves_full_model`, `export_method`, `load_method`; and every scoring forward runs inside `batch_context(model,
batch)`, which enters the `batch_context` of each registered method whose layers are in the model (a method's
layers are the `AdapterModule` classes its module defines). Objectives never import a method module.

Most of that is method-independent and lives here, because every adapter module subclasses
`AdapterModule`: a module that (1) knows which of its parameters are adapter parameters, (2) can be switched
off, and (3) can `unwrap()` itself back into the plain module it replaced. `merge`, `set_enabled`,
`disabled`, `adapter_state_dict` and `load_adapter_state_dict` below work for any such module, so a new
method only writes its layer class and a `wrap`.

Target patterns (`match_modules`, the "all-linear" preset) are resolved in targets.py.
"""

from __future__ import annotations

import importlib
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Iterator

import torch
from torch import nn

from ..errors import TunelabError
from .targets import (ALL_LINEAR, decoder_stack, is_router, match_modules, pattern_matches,  # noqa: F401
                      pattern_value)

# Registry-free dispatch: method name -> module path. Adding a method is one line here.
_METHODS = {
    "full": "tunelab.adapters.full",
    "lora": "tunelab.adapters.lora",
    "dora": "tunelab.adapters.dora",
    "qlora": "tunelab.adapters.qlora",
    "mora": "tunelab.adapters.mora",
    "loreft": "tunelab.adapters.loreft",
    "freeze": "tunelab.adapters.partial",
    "partial": "tunelab.adapters.partial",
}


def get_method(name: str) -> ModuleType:
    """Return the module implementing adapter method `name` (imported on first use)."""
    if name not in _METHODS:
        raise TunelabError(f"adapter method '{name}' is unknown; choose from {', '.join(sorted(_METHODS))}")
    return importlib.import_module(_METHODS[name])


def method_names() -> list[str]:
    return sorted(_METHODS)


# ------------------------------------------------------------------------------------- what a run calls
def apply_method(model: nn.Module, method: str, options) -> AdapterReport:
    """Wrap `model` in place with `method` (any method, `full` included); `options` is the method's Config,
    a dict of its fields, or None for its defaults (`config.method_options(cfg)`)."""
    return get_method(method).wrap(model, options)


def check_method_data(method: str, examples) -> None:
    """Refuse encoded examples `method` cannot train on (its optional `check_examples`; LoReFT: no prompt)."""
    check = getattr(get_method(method), "check_examples", None)
    if check is not None:
        check(examples)


def saves_full_model(method: str) -> bool:
    """Does a run with `method` save the whole HF model (`model/`: full, freeze) rather than `export_method`'s
    adapter folder (`adapter/`)?"""
    return bool(getattr(get_method(method), "SAVES_FULL_MODEL", False))


def export_method(model: nn.Module, method: str, options, path, base_model_name_or_path: str | None = None):
    """Write the adapter of the `method`-wrapped `model` to folder `path`: PEFT's format where PEFT has the
    method, tunelab's own otherwise (native_format.py). Returns the folder's Path."""
    return get_method(method).export(model, options, path, base_model_name_or_path=base_model_name_or_path)


def load_method(model: nn.Module, method: str, path) -> AdapterReport:
    """Wrap the base `model` with the `method` adapter saved in folder `path` (the inverse of `export_method`)."""
    return get_method(method).load(model, path)


def _batch_hooks(model: nn.Module) -> list:
    """The `batch_context` hooks of the registered methods whose layers are in `model` (none for most)."""
    registered = set(_METHODS.values())
    present = {type(m).__module__ for m in model.modules() if isinstance(m, AdapterModule)} & registered
    hooks = (getattr(importlib.import_module(name), "batch_context", None) for name in sorted(present))
    return [h for h in hooks if h is not None]


def reads_batch(model: nn.Module) -> bool:
    """Does a method in `model` read the batch's layout in its forward (`batch_context`; LoReFT: prompt
    positions)? Then a scoring forward must keep the batch's own rows, not a rearranged copy of them."""
    return bool(_batch_hooks(model))


@contextmanager
def batch_context(model: nn.Module, batch: dict):
    """Inside the block, forwards of `model` on `batch` see what their methods need from the batch (LoReFT: the
    prompt positions from `batch["prompt_mask"]`). A no-op for a model without such a method. Every scoring
    forward (objectives.logprobs.forward_hidden) runs inside it."""
    hooks = _batch_hooks(model)
    if not hooks:
        yield model
        return
    with ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(hook(model, batch))
        yield model


# --------------------------------------------------------------------------------------------- report
@dataclass
class AdapterReport:
    """What `wrap` did: which modules got an adapter, which are trained fully, and the parameter budget."""

    method: str
    replaced: list[str]
    trainable: int
    total: int
    extras: list[str] = field(default_factory=list)  # modules trained fully (modules_to_save)
    tied: list[list[str]] = field(default_factory=list)  # groups of extras sharing one weight
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        line = (f"{self.method}: {len(self.replaced)} modules, "
                f"trainable {self.trainable:,} / {self.total:,} ({pct:.2f}%)")
        if self.extras:
            line += f", fully trained: {', '.join(self.extras)}"
        if self.tied:
            line += " (tied: " + "; ".join("=".join(g) for g in self.tied) + ")"
        return line


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over unique Parameters: a tied embedding/head weight counts once."""
    trainable = total = 0
    for p in model.parameters():  # .parameters() already de-duplicates shared tensors
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# ------------------------------------------------------------------------------------- adapter modules
class AdapterModule(nn.Module):
    """Base of every module an adapter method swaps into the model.

    Subclasses honour `adapter_enabled` in `forward` (False = behave exactly like the base module), list
    their adapter parameters (local names) in `adapter_parameter_names`, give `linear_params` where a
    weight-space form exists, and implement `unwrap(in_place)` returning the plain module with the update
    folded in. `in_place=False` means the base weight is shared with another module (a tied embedding) and
    must not be modified; the subclass must then give the merged module its own weight.
    """

    adapter_enabled: bool = True

    def adapter_parameter_names(self) -> list[str]:
        raise NotImplementedError

    def unwrap(self, in_place: bool = True) -> nn.Module:
        raise NotImplementedError

    def linear_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) such that F.linear(x, weight, bias) equals this module's output in its current
        state, differentiable. For code that applies a head functionally (chunked lm_head log-probs)."""
        raise NotImplementedError(f"{type(self).__name__} has no weight-space form")


def linear_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a linear-like module, adapter-aware.

    Reading `module.weight` directly would skip a LoRA update on the module (W0 instead of W0 + s·BA) and, for
    a fully trained module under `disabled()`, return the trained weight instead of the frozen base. Use
    this wherever a head is applied with F.linear. Exact except for LoRA dropout in training mode.
    """
    if isinstance(module, AdapterModule):
        return module.linear_params()
    return module.weight, getattr(module, "bias", None)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            yield name, module


def has_adapter(model: nn.Module) -> bool:
    return next(adapter_modules(model), None) is not None


def ensure_no_adapter(model: nn.Module, method: str) -> None:
    found = next(adapter_modules(model), None)
    if found is not None:
        raise TunelabError(f"{method}: the model already has an adapter ({found[0]}); merge it first")


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter module on or off; off = the frozen base model, bit for bit."""
    for _, module in adapter_modules(model):
        module.adapter_enabled = bool(enabled)


@contextmanager
def disabled(model: nn.Module):
    """Run the base model inside the block (the DPO/KL reference), restoring each module's state after."""
    mods = [m for _, m in adapter_modules(model)]
    if not mods:
        # A silent no-op would make a "reference" identical to the policy; fail loudly instead.
        raise RuntimeError("disabled(model): the model has no adapter to disable")
    before = [m.adapter_enabled for m in mods]
    try:
        for m in mods:
            m.adapter_enabled = False
        yield model
    finally:
        for m, flag in zip(mods, before):
            m.adapter_enabled = flag


def adapter_parameters(model: nn.Module, dedup: bool = True) -> dict[str, nn.Parameter]:
    """Full-name -> Parameter for adapter parameters. With `dedup`, a Parameter shared by two modules (a
    tied embedding trained fully) appears once, under the first name in module order."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in adapter_modules(model):
        for local in module.adapter_parameter_names():
            p = module.get_parameter(local)
            if dedup and id(p) in seen:
                continue
            seen.add(id(p))
            out[f"{name}.{local}" if name else local] = p
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached adapter tensors keyed by module path (`...q_proj.lora_A.weight`, `lm_head.weight`)."""
    return {k: p.detach() for k, p in adapter_parameters(model).items()}


def load_adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy `sd` into the adapter parameters; every key must exist and every adapter key must be given."""
    params = adapter_parameters(model)
    if not params:
        raise TunelabError(f"{source}: the model has no adapter to load into; wrap it first")
    unknown = [k for k in sd if k not in params]
    missing = [k for k in params if k not in sd]
    if unknown:
        raise TunelabError(f"{source}: unexpected key '{unknown[0]}' ({len(unknown)} unknown keys); "
                           f"expected keys like '{next(iter(params))}'")
    if missing:
        raise TunelabError(f"{source}: missing key '{missing[0]}' ({len(missing)} missing keys)")
    with torch.no_grad():
        for k, t in sd.items():
            p = params[k]
            if tuple(t.shape) != tuple(p.shape):
                raise TunelabError(f"{source}: '{k}' has shape {tuple(t.shape)}, the model expects "
                                   f"{tuple(p.shape)} (different rank or base model?)")
            p.copy_(t.to(device=p.device, dtype=p.dtype))


def merge(model: nn.Module) -> list[str]:
    """Replace every adapter module by its unwrapped, merged plain module. Returns the merged names."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    merged, untied = [], False
    for name, module in list(adapter_modules(model)):
        weight = getattr(module, "weight", None)
        # A weight also reachable through another module (tied lm_head/embeddings) must not absorb a LoRA
        # delta in place, or the embeddings would silently change too.
        in_place = not (isinstance(weight, nn.Parameter) and counts.get(id(weight), 0) > 1)
        plain = module.unwrap(in_place=in_place)
        if not in_place and getattr(plain, "weight", None) is not weight:
            untied = True  # the merged module got its own weight: the pair is no longer tied
        replace_module(model, name, plain)
        merged.append(name)
    if untied:
        untie_config(model)
    return merged


# --------------------------------------------------------------------------------------- model surgery
def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def untie_config(model: nn.Module) -> None:
    """Record that input and output embeddings are now separate, so save/load keeps both weights."""
    configs = [getattr(model, "config", None)]
    if configs[0] is not None and hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    for cfg in configs:
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False

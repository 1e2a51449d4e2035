"""The uniform adapter interface and the helpers every method shares.

An *adapter method* (LoRA, DoRA, MoRA, LoReFT, QLoRA…) is one module in this package exposing::

    Config                                   # pydantic model of the method's settings
    wrap(model, cfg) -> AdapterReport         # swap target modules for adapter modules, freeze the base
    merge(model) -> list[str]                 # fold the update into base weights, restore plain modules
    adapter_state_dict(model) -> dict         # trainable adapter tensors only, our own key names
    load_adapter_state_dict(model, sd)
    set_enabled(model, flag) / disabled(model)  # run the frozen base model (e.g. the DPO reference)
    export_peft(model, cfg, path)             # PEFT's on-disk format where PEFT has one
    wrap_objective(objective)   (optional)   # an objective whose loss sees each batch (LoReFT's positions)
    check_examples(examples)    (optional)   # refuse encoded data the method cannot train on, before a run

Most of that is method-independent and lives here, because every adapter module subclasses
`AdapterModule`: a module that (1) knows which of its parameters are adapter parameters, (2) can be switched
off, and (3) can `unwrap()` itself back into the plain module it replaced. `merge`, `set_enabled`,
`disabled`, `adapter_state_dict` and `load_adapter_state_dict` below work for any such module, so a new
method only writes its layer class and a `wrap`.

Target matching
---------------
`match_modules(model, patterns, what=...)` resolves user patterns to full module names. A pattern matches a
module name when ANY of these hold (so users can write what they are used to):

* suffix on a dot boundary: ``q_proj`` matches ``model.layers.0.self_attn.q_proj``; a full name matches itself;
* fnmatch glob over the full name: ``model.layers.1*.mlp.*``;
* regex ``re.fullmatch`` over the full name: ``.*\\.(q|v)_proj``.

The preset ``"all-linear"`` means every `nn.Linear` inside the decoder stack (the `nn.ModuleList` holding
the most parameters, e.g. ``model.layers``), so the output head ``lm_head`` is excluded, and MoE routers
(leaf names ``gate``, ``router``, ``shared_expert_gate``) are excluded as well: a low-rank update to a
router reshuffles expert choice, rarely what one wants. Explicit patterns are never filtered.
A pattern that matches nothing is a user error naming the pattern.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Iterable, Iterator

import torch
from torch import nn

from ..errors import TunelabError

ALL_LINEAR = "all-linear"
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")

# Registry-free dispatch: method name -> module path. Adding a method is one line here.
_METHODS = {
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


def pattern_value(patterns: dict, name: str, default):
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: the first key `k` with re.match(r'(.*\\.)?(k)$', name)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ----------------------------------------------------------------------------------------- matching
def pattern_matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # a glob like "layers.[0" is not a valid regex; that interpretation just fails
        return False


def decoder_stack(model: nn.Module) -> str | None:
    """Name of the `nn.ModuleList` with the most parameters: the decoder blocks in every HF causal LM."""
    best, best_n = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            n = sum(p.numel() for p in module.parameters())
            if n > best_n:
                best, best_n = name, n
    return best


def is_router(name: str) -> bool:
    return name.rpartition(".")[2] in ROUTER_NAMES


def _example_leaves(model: nn.Module, kinds: tuple[type, ...], limit: int = 8) -> str:
    leaves: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if name and not leaf.isdigit() and isinstance(module, kinds) and leaf not in leaves:
            leaves.append(leaf)
    return ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")


def match_modules(model: nn.Module, patterns: str | Iterable[str], *, what: str,
                  kinds: tuple[type, ...] | None = (nn.Linear,)) -> list[str]:
    """Resolve `patterns` (or "all-linear") to full module names, in model order.

    `kinds` restricts matches to module types the method can wrap (None = any module). Each pattern must
    match at least one module of those kinds, else TunelabError names the pattern and lists real names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise TunelabError(f"{what}: empty list; give module names like q_proj or '{ALL_LINEAR}'")
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen: dict[str, None] = {}  # ordered set
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            stack = decoder_stack(model)
            prefix = f"{stack}." if stack else ""
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            hits = [n for n, m in named if isinstance(m, nn.Linear) and n.startswith(prefix)
                    and not is_router(n) and m is not head]
        else:
            hits = [n for n, m in named if pattern_matches(pattern, n)]
            typed = [n for n in hits if kinds is None or isinstance(model.get_submodule(n), kinds)]
            if hits and not typed:
                kind = type(model.get_submodule(hits[0])).__name__
                raise TunelabError(f"{what}: pattern '{pattern}' matches only modules this method cannot wrap "
                                   f"({hits[0]} is a {kind}); linear modules are e.g. "
                                   f"{_example_leaves(model, kinds or (nn.Linear,))}")
            hits = typed
        if not hits:
            sort = "linear" if kinds == (nn.Linear,) else "matching"
            raise TunelabError(f"{what}: pattern '{pattern}' matches no module; {sort} modules are e.g. "
                               f"{_example_leaves(model, kinds or (nn.Module,))}")
        chosen.update(dict.fromkeys(hits))
    return list(chosen)

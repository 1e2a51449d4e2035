"""Modules trained fully next to an adapter (PEFT's `modules_to_save`), with tied weights kept consistent.

Typical extras are `embed_tokens` and `lm_head` (new tokens, a new chat template), final norms, or the
fused MoE `experts` (whose 3D weights no LoRA layer can wrap). Semantics, for a module with weight W0:

    enabled:   y = f(x; W)      W trainable, starts at W0
    disabled:  y = f(x; W0)     the frozen snapshot, so `disabled(model)` is exactly the base model

`FullyTrained` wraps such a module. It *adopts* the module's own Parameters and buffers under the same
attribute names, so state-dict keys stay `lm_head.weight` (any HF checkpoint still loads), and it keeps the
original module out of the module tree, calling it through `torch.func.functional_call` with either the
trainable parameters or the snapshot. Swapping module attributes (never `.data`) keeps autograd graphs of
earlier forwards valid, e.g. the policy pass before a DPO reference pass.

Tied weights
------------
In tied models (Gemma, SmolLM2) `lm_head.weight` *is* `embed_tokens.weight`. With `keep_tied=True`
(tunelab's default, PEFT's `ensure_weight_tying=True`) naming either module trains the one shared Parameter:
both modules are wrapped, share the trainable weight and the snapshot, stay tied through training and merge,
and the PEFT export lists both. With `keep_tied=False` (PEFT's default) each named module gets its *own*
copy, the model is untied (`config.tie_word_embeddings=False`) and the partner keeps the base weight.

Patterns are matched like target modules (suffix, glob, regex); a matched module is expanded to its
descendants that hold parameters directly, so `mlp` means `mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import TunelabError
from .base import AdapterModule, match_modules, untie_config


def _param_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(Parameter) -> names of all modules holding it directly (two names for a tied weight)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    return owners


def resolve(model: nn.Module, patterns: Iterable[str], *, what: str, keep_tied: bool = True) -> list[str]:
    """Names of the parameter-holding modules to train fully, tie partners added when `keep_tied`."""
    patterns = list(patterns or [])
    if not patterns:
        return []
    leaves: dict[str, None] = {}
    for name in match_modules(model, patterns, what=what, kinds=None):
        for sub, module in model.get_submodule(name).named_modules(prefix=name):
            if module._parameters and any(p is not None for p in module._parameters.values()):
                leaves[sub] = None
    if not leaves:
        raise TunelabError(f"{what}: {', '.join(patterns)} hold no parameters to train")
    for name in leaves:
        inner = next((o for o in leaves if name.startswith(o + ".")), None)
        if inner is not None:
            # A wrapper adopts only its module's direct parameters; nested wrappers would lose keys.
            raise TunelabError(f"{what}: '{inner}' and its submodule '{name}' both hold parameters; "
                               f"name the leaf modules instead")
    if keep_tied:
        owners = _param_owners(model)
        for name in list(leaves):
            for p in model.get_submodule(name)._parameters.values():
                if p is not None:
                    leaves.update(dict.fromkeys(owners[id(p)]))
    return list(leaves)


def tied_groups(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Groups (size > 1) of the given module names that share a Parameter."""
    groups: dict[int, list[str]] = {}
    for name in names:
        for p in model.get_submodule(name)._parameters.values():
            if p is not None:
                group = groups.setdefault(id(p), [])
                if name not in group:
                    group.append(name)
    return [g for g in groups.values() if len(g) > 1]


class FullyTrained(AdapterModule):
    """Train a module's parameters in place of the module, keeping a frozen snapshot for `disabled()`."""

    def __init__(self, inner: nn.Module, *, untie: set[int] | None = None, memo: dict | None = None):
        super().__init__()
        self._param_names: list[str] = []
        memo = {} if memo is None else memo
        for pname, p in inner._parameters.items():
            if p is None:
                self.register_parameter(pname, None)
                continue
            if untie and id(p) in untie:
                # Own copy to train; the untouched original (still used by the partner) is the snapshot.
                trained, snapshot = nn.Parameter(p.detach().clone()), p.detach()
            else:
                # Same Parameter object: keys and tying stay. One snapshot per shared Parameter (memo).
                trained, snapshot = p, memo.setdefault(id(p), p.detach().clone())
            trained.requires_grad_(True)
            self.register_parameter(pname, trained)
            self.register_buffer(f"_base_{pname}", snapshot, persistent=False)
            self._param_names.append(pname)
        for bname, b in inner._buffers.items():
            self.register_buffer(bname, b, persistent=bname not in inner._non_persistent_buffers_set)
        self._buffer_names = list(inner._buffers)
        # Held outside the module tree (no second copy of the keys); only its forward code is used. Set
        # last: before it, `__getattr__` must not answer `hasattr` checks from the inner module.
        object.__setattr__(self, "_inner", inner)

    def adapter_parameter_names(self) -> list[str]:
        return list(self._param_names)

    def forward(self, *args, **kwargs):
        src = (lambda n: self._parameters[n]) if self.adapter_enabled else (lambda n: self._buffers[f"_base_{n}"])
        tensors = {n: src(n) for n in self._param_names}
        tensors.update({n: self._buffers[n] for n in self._buffer_names})
        return torch.func.functional_call(self._inner, tensors, args, kwargs)

    def linear_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        def pick(n):
            if n not in self._param_names:
                return getattr(self._inner, n, None)
            return self._parameters[n] if self.adapter_enabled else self._buffers[f"_base_{n}"]

        return pick("weight"), pick("bias")

    def unwrap(self, in_place: bool = True) -> nn.Module:
        # The trained Parameters go back into the original module; a tied pair keeps sharing its Parameter.
        for n in self._param_names:
            self._inner._parameters[n] = self._parameters[n]
        for n in self._buffer_names:
            self._inner._buffers[n] = self._buffers[n]
        return self._inner

    def __getattr__(self, name: str):
        # HF code reads e.g. `embed_tokens.padding_idx` / `num_embeddings`; answer from the wrapped module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def extra_repr(self) -> str:
        return f"trained fully: {self._inner.__class__.__name__}({self._inner.extra_repr()})"


def wrap(model: nn.Module, names: list[str], *, keep_tied: bool = True) -> list[list[str]]:
    """Wrap each named module in `FullyTrained`. Returns the tied groups that stay tied."""
    if not names:
        return []
    groups = tied_groups(model, names) if keep_tied else []
    untie: set[int] = set()
    if not keep_tied:
        owners = _param_owners(model)
        untie = {pid for pid, mods in owners.items() if len(mods) > 1}
    memo: dict = {}
    touched_shared = False
    for name in names:
        inner = model.get_submodule(name)
        touched_shared |= any(id(p) in untie for p in inner._parameters.values() if p is not None)
        wrapped = FullyTrained(inner, untie=untie, memo=memo)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, wrapped)
    if touched_shared:
        untie_config(model)
    return groups

"""Fused frozen projections: q,k,v (and gate,up) of a decoder layer as one GEMM for the frozen base.

Under LoRA, DoRA and QLoRA the base weights of q_proj, k_proj and v_proj (gate_proj and up_proj) are frozen and
read the same input x. Instead of three GEMMs x W_qᵀ, x W_kᵀ, x W_vᵀ (and, in the backward pass, three GEMMs
into ∂x summed by two adds) one GEMM computes

    [y_q | y_k | y_v] = x [W_q; W_k; W_v]ᵀ (+ [b_q; b_k; b_v])        ∂x = [∂y_q | ∂y_k | ∂y_v] [W_q; W_k; W_v]

and each layer takes its slice as its base output; the adapter deltas (LoRA's s·B A x, DoRA's rescaling) are
applied by each layer to its own slice exactly as before. Mathematically the same sums; in fp32 the results
agree to rounding (tests/adapters/test_fused.py: logits and gradients within 1e-5).

How it stays invisible to everything else:
* float bases: the concatenated weight is the storage; each layer's `weight` (and `bias`) Parameter becomes a
  row view into it, so no weight is held twice and every key, name and Parameter object is unchanged.
  `unfuse` gives each its own storage back (the loop does so when training ends, before anything is saved).
* NF4 bases (QLoRA): nothing is stored; the dequantised weights are concatenated per forward and again in the
  backward pass (`qlora.NF4Matmul`, never saved).
* the fused output is computed when the group's first member (q_proj, gate_proj: the one the model calls
  first) is called; the others find their slice in a small per-group cache keyed by that input tensor's
  identity (and its version, grad mode and autocast state), taken out on use. A member called with a tensor
  the first one was not called with computes only its own slice with its own weight — correct, just not shared.
  DoRA with dropout is not fused: its dropped base path sees a different tensor in every layer.
* only each layer's `base_forward` is replaced (an instance attribute); adapter parameters, `adapter_state_dict`,
  PEFT export and merge see the same modules as without fusion.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import adapter_modules
from .dora import DoraLinear
from .lora import LoraLinear
from .qlora import NF4Matmul

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_CACHE = 4  # entries per group: a forward's input, DoRA's dropped input, and a spare


class FusedGroup:
    """Layers (same class, same input width) whose frozen base runs as one GEMM; see the module docstring."""

    def __init__(self, layers: list[LoraLinear]):
        self.layers = layers
        self.sizes = [m.out_features for m in layers]
        self.quantized = hasattr(layers[0], "quant_state")
        self.entries: list[list] = []  # [x, key, {index: slice}]
        self.weight = self.bias = None
        if not self.quantized:
            with torch.no_grad():
                self.weight = torch.cat([m.weight.detach() for m in layers])
                for m, piece in zip(layers, self.weight.split(self.sizes)):
                    m.weight.data = piece
                if layers[0].bias is not None:
                    self.bias = torch.cat([m.bias.detach() for m in layers])
                    for m, piece in zip(layers, self.bias.split(self.sizes)):
                        m.bias.data = piece
        for i, m in enumerate(layers):
            m.__dict__["base_forward"] = partial(self.base_forward, i)

    # -- the fused GEMM -------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:  # the stacked dequantised weights (what NF4Matmul reads)
        return torch.cat([m.base_weight() for m in self.layers])

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.layers[0].bias is None:
            return None
        return (self.bias if self.bias is not None else torch.cat([m.bias for m in self.layers])).to(dtype)

    def _compute(self, x: torch.Tensor, with_bias: bool) -> list[torch.Tensor]:
        if self.quantized:  # as _NF4Base.base_forward: compute dtype inside, the input's dtype out
            cd = self.layers[0].compute_dtype
            bias = self._bias(cd) if with_bias else None
            y = NF4Matmul.apply(x.to(cd), bias, self).to(x.dtype)
        else:
            y = F.linear(x, self.weight, self.bias if with_bias else None)
        return list(y.split(self.sizes, dim=-1))

    def base_forward(self, index: int, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """Layer `index`'s base output W_index x (+ b): its slice of the group's one GEMM on `x`."""
        key = (x._version, bool(with_bias), torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
        for entry in self.entries:
            if entry[0] is x and entry[1] == key and index in entry[2]:
                out = entry[2].pop(index)
                if not entry[2]:
                    self.entries.remove(entry)
                return out
        if index:  # not the first member (q_proj, gate_proj: called first by the model): its own GEMM only
            layer = self.layers[index]
            own = type(layer).base_forward
            return own(layer, x) if with_bias else own(layer, x, with_bias=False)
        pieces = self._compute(x, with_bias)
        rest = {i: p for i, p in enumerate(pieces) if i != index}
        self.entries = [e for e in self.entries if not (e[0] is x and e[1] == key)][-(_CACHE - 1):]
        self.entries.append([x, key, rest])
        return pieces[index]

    def unfuse(self) -> None:
        """Each layer back to its own weight storage and its class's own base_forward."""
        self.entries.clear()
        with torch.no_grad():
            for m in self.layers:
                m.__dict__.pop("base_forward", None)
                if not self.quantized:
                    m.weight.data = m.weight.data.clone()
                    if m.bias is not None:
                        m.bias.data = m.bias.data.clone()
        self.weight = self.bias = None


def _fusable(layers: list) -> bool:
    if not all(isinstance(m, LoraLinear) for m in layers):
        return False  # a projection left out of target_modules (or another method's layer): keep it as it is
    first = layers[0]
    if any(type(m) is not type(first) or m.in_features != first.in_features or "base_forward" in m.__dict__
           for m in layers):
        return False
    if len({m.bias is None for m in layers}) > 1:
        return False  # some with bias, some without: not one addmm
    if isinstance(first, DoraLinear) and not isinstance(first.lora_dropout, nn.Identity):
        return False  # a per-layer dropped input for the base: nothing to share
    if hasattr(first, "quant_state"):
        return all(m.compute_dtype == first.compute_dtype for m in layers)
    w = first.weight
    return all(m.weight.dtype == w.dtype and m.weight.device == w.device and not m.weight.requires_grad
               for m in layers)


def fuse_projections(model: nn.Module) -> tuple[list[FusedGroup], Callable[[], None]]:
    """Fuse every q,k,v and gate,up sibling set of LoRA/DoRA/QLoRA layers in `model`.

    Returns (groups, undo): `undo()` unfuses them all (each weight its own storage again). Sets whose members
    are not all adapter layers of one class with one input width are left alone."""
    parents: dict[str, dict[str, nn.Module]] = {}
    for name, module in adapter_modules(model):
        parent, _, leaf = name.rpartition(".")
        parents.setdefault(parent, {})[leaf] = module
    groups = []
    for children in parents.values():
        for names in GROUPS:
            layers = [children.get(n) for n in names]
            if all(m is not None for m in layers) and _fusable(layers):
                groups.append(FusedGroup(layers))

    def undo() -> None:
        for g in groups:
            g.unfuse()
    return groups, undo


def is_fused(module: nn.Module) -> bool:
    return isinstance(module, LoraLinear) and "base_forward" in module.__dict__

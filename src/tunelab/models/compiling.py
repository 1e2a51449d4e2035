"""`train.compile`: each decoder layer's forward runs through `torch.compile` (inductor) while training.

Regional compilation: one compiled function per decoder-layer class, called with the layer as its first argument,
so the 30 layers of a model share one graph (two: the first layer's input needs no gradient under an adapter)
instead of compiling 30 copies, and the compile cost is paid once (minutes on a 2-core CPU; inductor writes C++
and needs a C++ compiler there). The matmuls stay library calls; what inductor gains is fusing the elementwise
work around them (norms, rotary, SwiGLU, residual adds, forward and backward). `benchmarks/ab.py compile`
measures compile time and steady-state step time against eager; benchmarks/README.md has the verdict.

Like `models.checkpointing`, the wrapper is an instance attribute over each layer's `forward`: parameter names,
state dicts and exported adapters are unchanged, `undo()` restores the layers, and the compiled path is taken only
while the layer is training with gradients on. Evaluation, scoring and generation (no gradients, a KV cache whose
length changes every token) run eager, so they never trigger a recompile. Packed batches that take the
per-document attention path (`models.attention`, long rows of many documents) also run eager: their span lists are
Python ints that a compiled graph would specialise on, recompiling for every batch.
"""

from __future__ import annotations

import shutil
from typing import Callable

import torch

from ..errors import TunelabError
from .attention import SEGMENTS_KEY
from .checkpointing import decoder_layers

_COMPILED: dict[type, Callable] = {}  # layer class → its compiled forward (shared by every instance)


def check_compile(device: torch.device | str, distributed: bool = False) -> None:
    """One line if `train.compile: true` cannot work here (before a run writes anything)."""
    if distributed:
        raise TunelabError("train.compile: not supported under torchrun yet (single-process runs only); "
                           "set train.compile=false")
    if torch.device(device).type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise TunelabError("train.compile: torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; "
                           "install one or set train.compile=false")


def compiled_forward(layer_class: type) -> Callable:
    if layer_class not in _COMPILED:
        _COMPILED[layer_class] = torch.compile(layer_class.forward)
    return _COMPILED[layer_class]


def compile_layers(model) -> Callable[[], None]:
    """Run every decoder layer's training forward through torch.compile; returns a function undoing it."""
    layers = decoder_layers(model)
    for layer in layers:
        original, compiled = layer.forward, compiled_forward(type(layer))

        def forward(*args, _layer=layer, _original=original, _compiled=compiled, **kwargs):
            if _layer.training and torch.is_grad_enabled() and SEGMENTS_KEY not in kwargs:
                return _compiled(_layer, *args, **kwargs)
            return _original(*args, **kwargs)

        layer.forward = forward

    def undo() -> None:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    return undo

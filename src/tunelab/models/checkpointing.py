"""Selective activation checkpointing: recompute one part of every decoder layer in the backward pass instead
of keeping its activations.

Full checkpointing (`train.gradient_checkpointing`, transformers' own) keeps only each layer's input and reruns
the whole layer, ~⅓ more compute. Checkpointing one part trades less: the MLP holds most of a layer's saved
activations on a small model (gate and up outputs, the activation, their product and the LoRA inputs, all
[tokens, intermediate] fp32), attention with a fused kernel keeps little (q, k, v, output and the log-sum-exp).
`benchmarks/ab.py checkpoint` measures the saved bytes per token and the time of each choice exactly.

The wrapper is an instance attribute over the module's `forward`, so parameter names, state dicts and
exported adapters are unchanged; it only acts while the module is training with gradients on.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

PARTS = ("mlp", "attention", "layer")


def decoder_layers(model) -> list[torch.nn.Module]:
    body = getattr(model, model.base_model_prefix, model)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to checkpoint")
    return list(layers)


def _part(layer, part: str):
    if part == "layer":
        return layer
    name = "mlp" if part == "mlp" else "self_attn"
    module = getattr(layer, name, None)
    if module is None:
        raise ValueError(f"{type(layer).__name__} has no {name} to checkpoint")
    return module


def checkpoint_layers(model, part: str = "mlp") -> Callable[[], None]:
    """Checkpoint `part` ("mlp", "attention" or "layer") of every decoder layer; returns a function undoing it."""
    if part not in PARTS:
        raise ValueError(f"unknown checkpoint part {part!r} (choose from {', '.join(PARTS)})")
    modules = [_part(layer, part) for layer in decoder_layers(model)]
    for module in modules:
        original = module.forward

        def forward(*args, _module=module, _original=original, **kwargs):
            if _module.training and torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        module.forward = forward

    def undo() -> None:
        for module in modules:
            module.__dict__.pop("forward", None)
    return undo

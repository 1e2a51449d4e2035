"""Optimizer and learning-rate schedule.

Any `torch.optim` optimizer by name (AdamW default). Weight decay applies to matrices only — biases, norms and
LoRA-free vectors are not decayed (the usual practice since BERT). The schedule is a linear warmup followed by
cosine, linear or constant decay towards `min_lr_ratio · lr`:

    warmup:  lr_t = lr · t / W                                     (t < W)
    cosine:  lr_t = lr · (ρ + (1 − ρ) · ½(1 + cos(π · p))),  p = (t − W) / (S − W)
    linear:  lr_t = lr · (ρ + (1 − ρ) · (1 − p))
"""

from __future__ import annotations

import inspect
import math

import torch

from ..errors import TunelabError


def optimizer_class(name: str) -> type:
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or name == "Optimizer":
        raise TunelabError(f"train.optimizer: unknown torch.optim optimizer '{name}'")
    if name == "SparseAdam":  # its step fails on the dense gradients every model here has
        raise TunelabError("train.optimizer: SparseAdam needs sparse gradients; use Adam or AdamW")
    step = inspect.signature(cls.step).parameters.get("closure")
    if step is not None and step.default is inspect.Parameter.empty:
        raise TunelabError(f"train.optimizer: {name} needs a closure that re-evaluates the loss; the training loop "
                           "takes one step per batch (use e.g. AdamW, SGD)")
    return cls


def check_optimizer(cfg) -> None:
    """Build the configured optimizer on a dummy parameter, before a run writes anything: an unknown name or a
    value torch refuses (betas, lr) fails as one line."""
    try:
        build_optimizer([("w", torch.nn.Parameter(torch.zeros(2, 2))), ("b", torch.nn.Parameter(torch.zeros(2)))],
                        cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas)
    except (ValueError, TypeError) as e:
        raise TunelabError(f"train.optimizer: {cfg.optimizer} refuses these settings ({str(e).splitlines()[0]})") \
            from None


def build_optimizer(params, name: str, lr: float, weight_decay: float, betas=(0.9, 0.999)):
    cls = optimizer_class(name)
    named = [(n, p) for n, p in params if p.requires_grad]
    if not named:
        raise TunelabError("nothing to train: no parameter requires gradients")
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = {"lr": lr}
    if "betas" in inspect.signature(cls.__init__).parameters:
        kwargs["betas"] = tuple(betas)
    return cls(groups, **kwargs)


def lr_lambda(kind: str, total: int, warmup: int, min_ratio: float = 0.0):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * p)) if kind == "cosine" else 1 - p
        return min_ratio + (1 - min_ratio) * shape

    return f


def build_scheduler(optimizer, kind: str, total: int, warmup: int, min_ratio: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, total, warmup, min_ratio))

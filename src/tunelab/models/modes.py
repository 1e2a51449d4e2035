"""Module modes shared by every layer that runs a model without training it (scoring, sampling, evaluation)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext


@contextmanager
def eval_mode(model):
    """``with eval_mode(model):`` — the model in eval mode inside, its previous training flag restored after.

    ``model.train(flag)`` sets the flag on every submodule, so a model whose submodules had mixed flags comes
    back uniform (as it would from any ``model.train()`` call).
    """
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def training_autocast(model):
    """The precision the training loop computes losses in: bf16 autocast over fp32 weights where the run's
    `train.compute_dtype` resolved to bf16 (`models.precision`: recorded on the model by the loop), else none.
    A model the loop has not marked keeps the old rule: bf16 autocast on CUDA over fp32 weights, none on CPU.
    Anything that must reproduce the loop's log-probs (online RL's π_old recompute and mismatch metric) uses it."""
    import torch

    p = next(model.parameters())
    if p.dtype != torch.float32 or p.device.type not in ("cuda", "cpu"):
        return nullcontext()  # 16-bit weights compute in their own dtype; autocast adds nothing
    if "tunelab_compute_dtype" in model.__dict__:
        dtype = model.__dict__["tunelab_compute_dtype"]
        return torch.autocast(p.device.type, dtype=dtype) if dtype is not None else nullcontext()
    if p.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()

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
    """The precision the training loop computes losses in: bf16 autocast on CUDA over fp32 weights, else none.
    Anything that must reproduce the loop's log-probs (online RL's π_old recompute and mismatch metric) uses it."""
    import torch

    p = next(model.parameters())
    if p.device.type == "cuda" and p.dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()

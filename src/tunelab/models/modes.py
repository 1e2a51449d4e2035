"""Module modes shared by every layer that runs a model without training it (scoring, sampling, evaluation)."""

from __future__ import annotations

from contextlib import contextmanager


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

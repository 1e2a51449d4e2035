"""The objective interface the training loop calls.

    loss_sum, n, metrics = objective.loss(model, batch)

`loss_sum` is a *sum* over the micro-batch and `n` the number of units it sums over (loss tokens for SFT,
pairs for preference losses). The loop adds both over all accumulated micro-batches (and devices) and divides
once, so 4 micro-batches of 2 give exactly the gradient of one batch of 8 — not a mean of per-batch means,
which over-weights tokens of short batches.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    name: str

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]: ...


# Optional hooks, for objectives with state of their own (a moving DPO/KTO reference):
#   on_step(step)          called by the loop after optimizer step `step` (1-based), before any evaluation
#   state_dict()           tensors saved with every checkpoint (`objective.safetensors`), so resume is exact
#   load_state_dict(sd)    restores them when a run resumes from that checkpoint

"""Sums over the ranks of a data-parallel run, for the statistics a rollout round computes over the whole batch.

Each rank builds the rows of its own prompts; statistics that normalise over the round (PPO's reward
normalisation and advantage whitening, the adaptive-KL controller's mean KL) must see every rank's rows, or
each rank would normalise by its own and a run on N ranks would not be the run on one process with N times the
batch (verl whitens the whole batch the same way). `all_sum` is the identity outside torchrun; every rank of a
round calls it in the same order (the rounds are in step), so no rank waits alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ of `t` over the ranks (float64 on the wire, returned in `t`'s dtype and device); `t` itself on one."""
    if world() == 1:
        return t
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = t.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(out)
    return out.to(device=t.device, dtype=t.dtype)

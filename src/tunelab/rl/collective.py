"""Sums over the ranks of a data-parallel run, for the statistics a rollout round computes over the whole batch.

Each rank builds the rows of its own prompts; statistics that normalise over the round (PPO's reward
normalisation and advantage whitening, the adaptive-KL controller's mean KL, REINFORCE++'s batch normalisation,
the train–inference mismatch) must see every rank's rows, or
each rank would normalise by its own and a run on N ranks would not be the run on one process with N times the
batch (verl whitens the whole batch the same way). `all_sum` and `all_max` are the identity outside torchrun;
every rank of a round calls them in the same order (the rounds are in step), so no rank waits alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ of `t` over the ranks (float64 on the wire, returned in `t`'s dtype and device); `t` itself on one."""
    return _all_reduce(t, "SUM")


def all_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max of `t` over the ranks (as `all_sum`: float64 on the wire); `t` itself on one."""
    return _all_reduce(t, "MAX")


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    if world() == 1:
        return t
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = t.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(out, op=getattr(dist.ReduceOp, op))
    return out.to(device=t.device, dtype=t.dtype)

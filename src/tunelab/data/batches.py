"""Batch sources: what the training loop draws micro-batches from.

A batch source has ``per_epoch`` (micro-batches per pass) and ``get(epoch, index) -> batch``; optionally
``state_dict() -> dict`` / ``load_state_dict(dict)`` (JSON-able), which the loop saves in every checkpoint and
restores on resume. The loop never asks what kind of source it has:

* `StaticBatches` — a fixed dataset, shuffled per epoch by a pure function of (seed, epoch), so it needs no
  state: every offline objective (SFT, DPO, KTO, reward…) trains from one;
* an online RL rollout source (prompts → samples → rewards → advantages) is the next implementation; its prompt
  cursor and RNG are its state.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchSource(Protocol):
    per_epoch: int

    def get(self, epoch: int, index: int) -> dict: ...


@dataclass
class StaticBatches:
    """Micro-batches in a deterministic order: `make(epoch)` returns that epoch's list of batches (cached one
    epoch at a time)."""

    make: Callable[[int], list[dict]]
    per_epoch: int
    _cache: dict = field(default_factory=dict)

    def get(self, epoch: int, index: int) -> dict:
        if epoch not in self._cache:
            self._cache = {epoch: self.make(epoch)}
        return self._cache[epoch][index]


def shuffled_batches(items: list, batch_size: int, seed: int, collate_fn: Callable[[list], dict],
                     rank: int = 0, world: int = 1) -> StaticBatches:
    """`items` reshuffled every epoch from (seed, epoch) and collated `batch_size` at a time.

    Data parallel (`world` ranks): a global micro-batch is `world · batch_size` consecutive rows of the same
    order and rank r collates its r-th slice of it, so the ranks together see exactly the rows one process
    with batch `world · batch_size` sees. A rank whose slice of the last, short batch is empty gets one row
    marked ``zero_weight`` (it must still take part in the step's collectives; the loop counts it as nothing)."""
    span = batch_size * world

    def make(epoch: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed * 1000003 + epoch)
        order = torch.randperm(len(items), generator=g).tolist()
        out = []
        for k in range(0, len(order), span):
            chunk = order[k:k + span]
            mine = chunk[rank * batch_size:(rank + 1) * batch_size]
            out.append(collate_fn([items[i] for i in mine]) if mine
                       else {**collate_fn([items[chunk[0]]]), "zero_weight": True})
        return out

    return StaticBatches(make, math.ceil(len(items) / span))


@dataclass
class RunContext:
    """What a batch source that generates its batches (online RL rollouts) needs from the run: the policy, its
    tokenizer and chat template, the objective (its reference, its rollout mode) and the run directory."""

    model: object
    tokenizer: object
    template: object
    objective: object
    run_dir: object = None
    rank: int = 0  # data parallel: this process's rank and the number of ranks (train/distributed.py)
    world: int = 1
    # a context in which the model may run outside the training step (all FSDP2 units gathered; no-op otherwise)
    gathered: Callable = contextlib.nullcontext

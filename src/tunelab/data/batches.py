"""Batch sources: what the training loop draws micro-batches from.

A batch source has ``per_epoch`` (micro-batches per pass) and ``get(epoch, index) -> batch``; optionally
``state_dict() -> dict`` / ``load_state_dict(dict)`` (JSON-able), which the loop saves in every checkpoint and
restores on resume. The loop never asks what kind of source it has:

* `StaticBatches` — a fixed dataset, shuffled per epoch by a pure function of (seed, epoch), so it needs no
  state: every offline objective (SFT, DPO, KTO, reward…) trains from one;
* `rl.rollout.RolloutSource` — online objectives (grpo, rloo, ppo, rejection_sampling, online_dpo): each "epoch"
  is a rollout round (prompts → samples → rewards → rows); its state is the round in progress.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchSource(Protocol):
    per_epoch: int

    def get(self, epoch: int, index: int) -> dict: ...


@dataclass
class StaticBatches:
    """Micro-batches in a deterministic order: `make(epoch)` returns that epoch's sequence of batches (cached
    one epoch at a time). `shuffled_batches` makes it a `LazyEpoch`, so a batch exists only while it is used."""

    make: Callable[[int], Sequence[dict]]
    per_epoch: int
    _cache: dict = field(default_factory=dict)

    def get(self, epoch: int, index: int) -> dict:
        if epoch not in self._cache:
            self._cache = {epoch: self.make(epoch)}
        return self._cache[epoch][index]


@dataclass
class LazyEpoch(Sequence):
    """One epoch's batches, collated on demand from the dataset's own items and the epoch's order (a list of
    ints): held memory is flat in dataset size (issue #16: building a whole epoch of collated batches up front,
    each packed one with a dense [B, 1, T, T] mask, reached ≥ 4 GB for 10k records before step 1). Collation is
    a pure function of (items, order), so the same index gives the same batch, which exact resume relies on."""

    items: list
    order: list[int]
    batch_size: int
    collate_fn: Callable[[list], dict]
    rank: int = 0
    world: int = 1

    def __len__(self) -> int:
        return math.ceil(len(self.order) / (self.batch_size * self.world))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        span = self.batch_size * self.world
        chunk = self.order[index * span:(index + 1) * span]
        mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        if not mine:  # this rank's share of a short last batch is empty: one row that counts as nothing
            return {**self.collate_fn([self.items[chunk[0]]]), "zero_weight": True}
        return self.collate_fn([self.items[i] for i in mine])


def shuffled_batches(items: list, batch_size: int, seed: int, collate_fn: Callable[[list], dict],
                     rank: int = 0, world: int = 1, lengths: list[int] | None = None,
                     group: int = 64) -> StaticBatches:
    """`items` reshuffled every epoch from (seed, epoch) and collated `batch_size` at a time, when asked for.

    Data parallel (`world` ranks): a global micro-batch is `world · batch_size` consecutive rows of the same
    order and rank r collates its r-th slice of it, so the ranks together see exactly the rows one process
    with batch `world · batch_size` sees. A rank whose slice of the last, short batch is empty gets one row
    marked ``zero_weight`` (it must still take part in the step's collectives; the loop counts it as nothing).

    `lengths` (one per item): group by length — each window of `group` batches of the shuffled order is sorted by
    length, so a batch holds similar lengths and little padding (bundled GSM data, batch 8: 29 % of padded
    positions → 8 %), then the batches are shuffled again so long and short ones alternate. Still a pure
    function of (seed, epoch), every item once per epoch."""

    def make(epoch: int) -> LazyEpoch:
        g = torch.Generator().manual_seed(seed * 1000003 + epoch)
        order = torch.randperm(len(items), generator=g).tolist()
        if lengths is not None:  # grouped by global micro-batch, so every rank's slice has similar lengths too
            span = batch_size * world
            w = group * span
            order = [i for k in range(0, len(order), w) for i in sorted(order[k:k + w], key=lengths.__getitem__)]
            chunks = [order[k:k + span] for k in range(0, len(order), span)]
            order = [i for c in torch.randperm(len(chunks), generator=g).tolist() for i in chunks[c]]
        return LazyEpoch(items, order, batch_size, collate_fn, rank, world)

    return StaticBatches(make, math.ceil(len(items) / (batch_size * world)))


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


def split_rows(batch: dict, rows: int = 1) -> list[dict]:
    """`batch` cut into consecutive chunks of `rows` rows (every tensor is row-major: ``[B, …]``), each trimmed
    to its own last real position when the batch has `seq_ids` (collate's layout; a 4-D mask is cut on both
    sequence axes). Memory mode runs an objective whose loss is a sum over rows chunk by chunk: the activations
    alive at once shrink to one chunk's, and the summed losses and gradients are the batch's."""
    B = batch["input_ids"].shape[0]
    out = []
    for k in range(0, B, rows):
        part = {key: v[k:k + rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == B else v
                for key, v in batch.items()}
        seq = part.get("seq_ids")
        if seq is not None:
            T = seq.shape[1]
            real = (seq >= 0).any(0).nonzero()
            width = int(real[-1]) + 1 if len(real) else 1
            if width < T:
                part = {key: _trim(v, T, width) for key, v in part.items()}
        out.append(part)
    return out


def _trim(v, T: int, width: int):
    if not torch.is_tensor(v) or v.dim() < 2 or v.shape[1] != T and v.shape[-1] != T:
        return v
    if v.dim() == 4:  # [B, 1, T, T] mask
        return v[:, :, :width, :width]
    return v[:, :width] if v.shape[1] == T else v

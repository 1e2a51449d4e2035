"""Batched, no-grad scoring: the one loop every evaluation runs, and the eval-mode switch it runs in.

Evaluating a model on a list of examples is always the same five steps, whatever is measured:

    for each chunk of `batch_size` examples, in order:
        1. collate the chunk into a batch of [B, T] tensors        (collate_fn: data/ knows how)
        2. move the batch to the model's device
        3. run fn(model, batch) without gradients, in eval mode     (no dropout: a pure function of the batch)
        4. keep what fn returned (floats, or small tensors moved to the CPU)
    then reduce the per-batch results                             (the caller's reduction, in batch order)

`score_batches` is that loop. Callers pass what differs — how to collate (`data.collate.collate` for one
sequence per row, `data.preference.collate_pairs` for chosen+rejected rows …) and what to compute per batch
(summed NLL, a reward, an objective's loss and metrics) — and reduce the list it returns themselves, so the
order of floating-point additions is theirs to state. `score_rows` adds the common case of one result per
example, optionally batching examples of similar length together (less padding) and returning the results in
input order. `eval_loss` is the held-out loss of a run, built on it (`token_nll` per batch, or an objective's
own loss).

The loop returns a list rather than yielding: a generator would suspend *inside* ``torch.no_grad()`` and
`eval_mode`, so the caller's own code between two batches would silently run without gradients, and a caller
that stopped early would leave the model in eval mode.

`eval_mode(model)` switches dropout (and any other train-only behaviour) off for the duration and restores the
model's own flag afterwards — also when the body raises, so a failed evaluation never leaves a model that is
about to train in eval mode (or an evaluated model in training mode). Everything that runs a model for
measurement or generation uses it; nothing else flips the flag by hand.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import torch

from ..console import advance, progress
from ..data.collate import collate
from ..models.modes import eval_mode
from .logprobs import token_logprobs




def model_device(model) -> torch.device:
    """The device of the model's first parameter: where its batches go."""
    return next(model.parameters()).device


def score_batches(model, examples: Sequence, collate_fn: Callable[[list], dict],
                  fn: Callable[[Any, dict], Any], *, batch_size: int, device=None) -> list:
    """``[fn(model, batch_1), fn(model, batch_2), …]`` for the examples in chunks of `batch_size`, in order.

    Batch k holds ``examples[k·batch_size : (k+1)·batch_size]`` collated by `collate_fn`, with every tensor
    moved to `device` (default: the model's). `fn` runs under ``torch.no_grad()`` and `eval_mode(model)`;
    return plain numbers or CPU tensors from it, so the list does not hold device memory.
    """
    if batch_size < 1:
        raise ValueError(f"score_batches: batch_size={batch_size}; need at least 1")
    device = model_device(model) if device is None else device
    results = []
    progress(-(-len(examples) // batch_size))  # the batches, to the phase being shown (console.phase), if any
    with torch.no_grad(), eval_mode(model):
        for k in range(0, len(examples), batch_size):
            batch = collate_fn(list(examples[k:k + batch_size]))
            batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
            results.append(fn(model, batch))
            advance()
    return results


def score_rows(model, examples: Sequence, collate_fn: Callable[[list], dict],
               fn: Callable[[Any, dict], Sequence], *, batch_size: int, device=None,
               sort_key: Callable[[Any], Any] | None = None) -> list:
    """One result per example, in input order; `fn` returns one item per example of its batch.

    With `sort_key` the batches are formed from the examples sorted by it (a stable sort) — e.g. ``len``, so
    neighbours of similar length share a batch and little compute goes to padding — and the results are put
    back in input order. Without it this is `score_batches` flattened.
    """
    order = list(range(len(examples)))
    if sort_key is not None:
        order.sort(key=lambda i: sort_key(examples[i]))
    per_batch = score_batches(model, [examples[i] for i in order], collate_fn, fn, batch_size=batch_size,
                              device=device)
    out: list = [None] * len(examples)
    flat = [item for items in per_batch for item in items]
    if len(flat) != len(examples):
        raise ValueError(f"score_rows: fn returned {len(flat)} results for {len(examples)} examples")
    for i, item in zip(order, flat):
        out[i] = item
    return out


def token_nll(model, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(− Σ log π_θ(x_t | x_<t) over the batch's loss tokens, their number): the plain next-token NLL.

    The same two numbers `sft.SFT.loss` returns for a dense model (SFT adds a mixture-of-experts model's router
    load-balancing loss on top)."""
    return -token_logprobs(model, batch, chunk_size).sum(), batch["loss_mask"][:, 1:].sum()


def eval_loss(model, examples: Sequence, pad_id: int, batch_size: int = 8, chunk_size: int = 1024,
              objective=None) -> float:
    """Mean NLL per loss token over `examples` (``Encoded``, one per row): Σ loss / Σ loss tokens.

        eval_loss = − Σ_examples Σ_t m_t · log π_θ(x_t | x_<t)  /  Σ_examples Σ_t m_t      (nats per token)

    Token-weighted over the whole set (the same quantity as a perplexity task's ``loss``; exp of it is the
    perplexity). With `objective`, its ``loss(model, batch) → (loss_sum, n, metrics)`` supplies the two sums
    instead, so a method's objective wrapper (LoReFT's prompt positions) and the objective's own extra terms (an
    MoE router loss in `sft.SFT`) are honoured; without one, `token_nll`. NaN for no examples.
    """
    if not examples:
        return float("nan")

    def loss_and_count(model, batch):
        if objective is None:
            loss_sum, n = token_nll(model, batch, chunk_size)
        else:
            loss_sum, n, _ = objective.loss(model, batch)
        return float(loss_sum), int(n)

    total, n = 0.0, 0
    for loss_sum, count in score_batches(model, examples, partial(collate, pad_id=pad_id), loss_and_count,
                                         batch_size=batch_size):
        total, n = total + loss_sum, n + count
    return total / max(n, 1)


class HeldOutLoss:
    """Run measures of token-level objectives (SFT): mean NLL per loss token on the held-out examples, through the
    objective itself; results.json gets ``eval_loss_before`` / ``eval_loss_after``."""

    def measure(self, model, train: list, evals: list, pad_id: int, cfg) -> dict:
        return {"eval_loss": eval_loss(model, evals, pad_id, objective=self)}

    def measure_during(self, model, evals: list, pad_id: int, cfg) -> dict:
        return self.measure(model, [], evals, pad_id, cfg)

    def result_fields(self, before: dict, after: dict) -> dict:
        return {"eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"]}

    def describe(self, m: dict) -> str:
        return f"held-out loss {m['eval_loss']:.4f}" if not math.isnan(m["eval_loss"]) else "no held-out set"

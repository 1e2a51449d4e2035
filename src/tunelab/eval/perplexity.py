"""Loss and perplexity of a model on a text or instruction dataset.

The examples go through exactly the data pipeline training uses (format → template → masking), so the number
is the same quantity the training loss measures, on data the model did not train on:

    loss       = − Σ_tokens log p(token | prefix) / (number of loss tokens)       (nats per token)
    perplexity = exp(loss)

Both are *token-weighted over the whole dataset* (a long example counts more than a short one), which is how
the held-out loss of a run is computed too (`objectives.scoring.eval_loss`). Only the loss tokens chosen by the
masking mode count: with ``masking: prompt`` on an instruction set this is the loss on the responses.
Log-probabilities come from `objectives.logprobs.token_logprobs`, which applies the lm_head in chunks to the
selected positions only, so a 49k-token vocabulary never materialises as ``[B, T, V]`` logits.

Loss per token depends on the tokenizer: compare perplexities only between models that share one (a base
model and its fine-tunes do).
"""

from __future__ import annotations

import math
from functools import partial

from ..data.collate import collate
from ..data.formats import to_sample
from ..data.masking import encode_dataset
from ..objectives.logprobs import target_mask, token_logprobs
from ..objectives.scoring import score_rows
from .tasks import Task, item_id


def _nll_rows(model, batch: dict, chunk_size: int) -> list[tuple[float, int]]:
    """(−Σ log p, number of loss tokens) of each row of `batch`."""
    lp = token_logprobs(model, batch, chunk_size)
    mask = target_mask(batch["loss_mask"])
    return [(-float(lp[row].sum()), int(mask[row].sum())) for row in range(lp.shape[0])]


def nll_sums(model, examples, pad_id: int, batch_size: int = 8, chunk_size: int = 1024) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, number of loss tokens) per `Encoded` example, in input order.

    Neighbours of similar length share a batch (shortest first), so little compute is spent on padding."""
    return score_rows(model, examples, partial(collate, pad_id=pad_id), partial(_nll_rows, chunk_size=chunk_size),
                      batch_size=batch_size, sort_key=len)


def evaluate_perplexity(model, tokenizer, template, task: Task, limit: int | None = None) -> dict:
    """Score a ``kind: perplexity`` task; returns ``{"metrics": {...}, "n": ..., ...}`` (see `runner`)."""
    spec = task.spec
    records = task.records(limit)
    # A chat without an assistant turn is still fine in masking modes that train the prompt; in `prompt` mode
    # it has no loss token and is dropped (and counted) by encode_dataset.
    samples = [to_sample(r, spec.format, require_assistant=False) for r in records]
    examples, stats = encode_dataset(tokenizer, samples, template, mode=spec.masking, turns=spec.turns,
                                     max_length=spec.max_length)
    sums = nll_sums(model, examples, tokenizer.pad_token_id, spec.batch_size)
    total = sum(s for s, _ in sums)
    n_tok = sum(n for _, n in sums)
    loss = total / max(n_tok, 1)
    return {
        "n": len(examples),
        "metrics": {"loss": loss, "perplexity": math.exp(min(loss, 700.0))},
        "primary": "loss",
        "higher_is_better": {"loss": False, "perplexity": False},
        "details": {"tokens": n_tok, "truncated": stats.n_truncated, "dropped_fully_masked": stats.n_fully_masked},
        "samples": [{"origin": ex.origin, "tokens": n, "loss": s / max(n, 1)}
                    for ex, (s, n) in zip(examples[:3], sums[:3])],
        # per document: its mean loss per token (the paired statistics compare documents, each counting once)
        "items": [{"id": item_id(task.name, i, list(ex.input_ids)), "score": s / max(n, 1),
                   "nll": s, "tokens": n} for i, (ex, (s, n)) in enumerate(zip(examples, sums))],
    }

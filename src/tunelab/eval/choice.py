"""Multiple choice by log-likelihood, and the continuation scorer it shares with the lm-eval adapter.

For a question with choices c_1 … c_n the model does not *generate* anything: each choice is appended to the
prompt and scored by its summed log-probability,

    ll_i = Σ_t log p(token_t of " " + c_i | prompt, earlier tokens of the choice)

``acc`` counts the item correct when the right choice has the largest ll_i. Longer choices collect more
negative terms, so ``acc_norm`` divides by the choice's length in *characters* first (ll_i / len(c_i)), as
lm-evaluation-harness does (Gao et al. 2021; characters rather than tokens so the number does not depend on
the tokenizer). Ties go to the first choice.

**Tokenization** follows lm-eval exactly so scores are comparable: trailing whitespace of the context moves
to the front of the continuation (a BPE token usually carries its leading space), the *joint* string is
tokenized once, and the continuation is whatever follows the tokens of the context alone. A tokenizer that
prepends bos by itself (Llama) gets it here too; an empty context gets bos (or eos) as the first token so the
first continuation token is still predicted from something.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..data.collate import collate
from ..data.masking import Encoded, adds_bos
from ..errors import TunelabError
from ..objectives.logprobs import forward_hidden, head_logits, output_head, target_mask, token_logprobs
from ..objectives.scoring import score_rows
from .tasks import Task, format_prompt, item_id


@dataclass
class Score:
    """Summed log-probability of a continuation, its token count, and whether greedy decoding produces it."""

    logprob: float
    n_tokens: int
    is_greedy: bool | None = None


def encode_pair(tokenizer, context: str, continuation: str, max_length: int | None = None) -> Encoded:
    """Token ids of context+continuation with `loss_mask` on the continuation tokens (lm-eval's splitting)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    prefix = []
    if adds_bos(tokenizer):
        prefix = [tokenizer.bos_token_id]
    elif not ctx:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prefix = [start]
    cont = whole[len(ctx):]
    if not cont:
        raise TunelabError(f"continuation {continuation!r} encodes to no tokens")
    ids = prefix + whole[:len(ctx)] + cont
    mask = [False] * (len(ids) - len(cont)) + [True] * len(cont)
    if max_length is not None and len(ids) > max_length:
        # Keep the continuation whole and as much context as fits, cutting from the left like lm-eval.
        ids, mask = ids[-max_length:], mask[-max_length:]
        mask[0] = False
    return Encoded(ids, mask, n_trained=sum(mask))


@torch.no_grad()
def _scores_with_greedy(model, batch: dict, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, T] and "target is the argmax" flags [B, T] on loss positions.

    The same chunked lm_head as `logprobs.head_logprobs` (adapter-aware, with the model's own logit transform),
    but keeping the argmax too (lm-eval's is_greedy).
    """
    hidden, _ = forward_hidden(model, batch)
    mask = target_mask(batch["loss_mask"])
    pos = mask.nonzero(as_tuple=True)
    h = hidden[pos[0], pos[1] - 1]
    targets = batch["input_ids"][pos]
    weight, bias, transform = output_head(model)
    lps, hits = [], []
    for i in range(0, h.shape[0], chunk_size):
        logits = head_logits(h[i:i + chunk_size], weight, bias, transform)
        t = targets[i:i + chunk_size]
        lps.append(logits.log_softmax(-1).gather(1, t[:, None])[:, 0])
        hits.append(logits.argmax(-1) == t)
    lp = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    greedy = torch.ones(mask.shape, dtype=torch.bool, device=hidden.device)
    if lps:
        lp = lp.index_put(pos, torch.cat(lps))
        greedy = greedy.index_put(pos, torch.cat(hits))
    return lp, greedy


def _row_scores(model, batch: dict, chunk_size: int, greedy: bool) -> list[Score]:
    """One `Score` per row of `batch`: summed log-prob and count of its loss tokens (+ is_greedy)."""
    mask = target_mask(batch["loss_mask"])
    if greedy:
        lp, hit = _scores_with_greedy(model, batch, chunk_size)
        flags = (hit | ~mask).all(-1).tolist()
    else:
        lp, flags = token_logprobs(model, batch, chunk_size), [None] * mask.shape[0]
    sums, counts = lp.sum(-1).tolist(), mask.sum(-1).tolist()
    return [Score(s, int(c), f) for s, c, f in zip(sums, counts, flags)]


def score_encoded(model, examples: list[Encoded], pad_id: int, batch_size: int = 8, chunk_size: int = 1024,
                  greedy: bool = False) -> list[Score]:
    """Score already-encoded (ids, loss_mask) examples; one `Score` per example, in input order.

    Longest first, so similar lengths share a batch (and an out-of-memory error comes at the first batch)."""
    return score_rows(model, examples, partial(collate, pad_id=pad_id),
                      partial(_row_scores, chunk_size=chunk_size, greedy=greedy),
                      batch_size=batch_size, sort_key=lambda e: -len(e))


def score_continuations(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8,
                        chunk_size: int = 1024, greedy: bool = False, max_length: int | None = None) -> list[Score]:
    """log p(continuation | context) for each (context, continuation) pair (lm-eval `loglikelihood`)."""
    examples = [encode_pair(tokenizer, c, x, max_length) for c, x in pairs]
    return score_encoded(model, examples, tokenizer.pad_token_id, batch_size, chunk_size, greedy)


def _answer_index(record, choices: list[str], field: str) -> int:
    gold = record.data.get(field)
    if isinstance(gold, bool) or gold is None:
        raise TunelabError(f"{record.origin}: field '{field}' must be the index of the correct choice")
    if isinstance(gold, str) and gold in choices:
        return choices.index(gold)
    try:
        idx = int(gold)
    except (TypeError, ValueError):
        raise TunelabError(f"{record.origin}: answer {gold!r} is neither a choice index nor one of the "
                           "choices") from None
    if not 0 <= idx < len(choices):
        raise TunelabError(f"{record.origin}: answer index {idx} out of range for {len(choices)} choices")
    return idx


def evaluate_choice(model, tokenizer, template, task: Task, limit: int | None = None) -> dict:
    """Score a ``kind: choice`` task: ``acc`` and ``acc_norm`` (see the module docstring)."""
    spec = task.spec
    items, pairs = [], []
    for rec in task.records(limit):
        choices = rec.data.get(spec.choices_field)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TunelabError(f"{rec.origin}: field '{spec.choices_field}' must be a list of at least two "
                               "strings")
        context = format_prompt(spec.prompt, rec, task.name)
        delim = spec.target_delimiter
        if spec.use_chat:
            # The generation prompt already ends where the answer starts (after the assistant header).
            context, delim = template.generation_prompt([{"role": "user", "content": context}]), ""
        items.append((rec, choices, _answer_index(rec, choices, spec.answer_field), len(pairs)))
        pairs += [(context, delim + c) for c in choices]
    scores = score_continuations(model, tokenizer, pairs, spec.batch_size, max_length=spec.max_length)
    acc = acc_norm = 0
    samples, scored = [], []
    for i, (rec, choices, gold, start) in enumerate(items):
        ll = [s.logprob for s in scores[start:start + len(choices)]]
        norm = [v / max(len(c), 1) for v, c in zip(ll, choices)]
        pick, pick_norm = ll.index(max(ll)), norm.index(max(norm))
        acc += pick == gold
        acc_norm += pick_norm == gold
        scored.append({"id": item_id(task.name, i, rec.data), "score": float(pick_norm == gold),
                       "acc": float(pick == gold), "pred": pick_norm})
        if len(samples) < 3:
            samples.append({"origin": rec.origin, "choices": choices, "answer": gold, "loglikelihoods": ll,
                            "pred": pick, "pred_norm": pick_norm})
    n = len(items)
    return {"n": n, "metrics": {"acc": acc / n, "acc_norm": acc_norm / n}, "primary": "acc_norm",
            "higher_is_better": {"acc": True, "acc_norm": True}, "samples": samples, "items": scored}

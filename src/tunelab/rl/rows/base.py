"""What every row builder shares: the scored round it gets, what it returns, and sequences from samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...sampling import Samples
from ..old_policy import settle_old_logprobs


@dataclass
class Round:
    """One scored rollout round on this rank: B = len(prompts) · G completions, the G of a prompt adjacent.

    index     the round number (an "epoch" of the rollout source)
    prompts   list of `rl.prompts.PromptExample`, this rank's prompts of the round
    samples   `sampling.Samples` — ids, masks, the sampler's log-probs (π_old), finish reasons
    texts     B completion texts, cut at the first stop string
    rewards   [B] fp32 — the weighted sum of the reward functions
    group     G, completions per prompt
    """

    index: int
    prompts: list
    samples: Samples
    texts: list[str]
    rewards: torch.Tensor
    group: int

    @property
    def truncated(self) -> torch.Tensor:
        """[B] bool: the completion ran out of tokens (no end of turn, eos or stop string)."""
        return torch.tensor([f == "length" for f in self.samples.finish_reason], dtype=torch.bool)


@dataclass
class RoundRows:
    """A round's training rows (a dict of CPU tensors, row-major), how many of them train (the first `served`;
    the rest, if any, are only there to fill an empty micro-batch), and the round's metrics."""

    rows: dict
    served: int
    metrics: dict = field(default_factory=dict)


class RowBuilder:
    """Turns a `Round` into training rows for one objective (see the package docstring)."""

    group_relative = False  # the learning signal is the reward spread within a prompt's group (rl/signal.py)

    def __init__(self, cfg, context, micro: int):
        self.cfg, self.ctx, self.micro = cfg, context, micro
        self.pad_id = context.tokenizer.pad_token_id

    def units(self, prompts: int, group: int) -> int:
        """The most rows a round of `prompts` prompts × `group` completions yields."""
        return prompts * group

    def build(self, rnd: Round) -> RoundRows:
        raise NotImplementedError

    def batch(self, rows: dict, idx: torch.Tensor) -> dict:
        """The micro-batch of rows `idx`, trimmed to its longest real row."""
        batch = {k: v[idx] for k, v in rows.items()}
        width = int(batch["attention_mask"].sum(-1).max())
        return {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}

    def truncation_advice(self) -> str | None:
        """How this objective would penalise a completion cut by ``rl.max_new_tokens``, when the run does not
        (`rl.signal.TruncationHint` shows it once); None: it does, or it has no such option."""
        return None

    def resume(self, last_round: int) -> None:
        """A run resumes after round `last_round` (−1: before any): forget what later rounds wrote."""

    def settle(self, rows: dict, rnd: Round) -> dict[str, float]:
        """For rows of every completion of `rnd` in order: mark the truncated ones (``truncated`` [B] bool, DAPO's
        overlong filtering) and score them once with the trainer while its weights are still the sampler's — the
        train–inference mismatch metrics, and π_old replaced by the trainer's with ``recompute_old_logprobs``
        (rl/old_policy.py)."""
        rows["truncated"] = rnd.truncated
        return settle_old_logprobs(rows, self.ctx.model, self.ctx.objective, self.cfg, self.micro)

    def sequences(self, samples: Samples, rows: list[int], with_logprobs: bool) -> dict:
        """Right-padded prompt+completion rows of `samples` (in the order of `rows`) with their masks:

            input_ids, attention_mask, position_ids [R, T] — the prompt's real tokens, then the completion's
            loss_mask [R, T] bool — the completion tokens; prompt_mask [R, T] bool — the prompt tokens
            old_logprobs [R, T] fp32 — the sampler's log-probs at the completion tokens (`with_logprobs`)
        """
        pm, cm = samples.prompt_mask.cpu().bool(), samples.completion_mask.cpu().bool()
        pids, cids, clp = samples.prompt_ids.cpu(), samples.completion_ids.cpu(), samples.logprobs.cpu()
        seqs = [(pids[i][pm[i]], cids[i][cm[i]], clp[i][cm[i]]) for i in rows]
        T = max(len(p) + len(c) for p, c, _ in seqs)
        B = len(seqs)
        out = {"input_ids": torch.full((B, T), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros(B, T, dtype=torch.long),
               "loss_mask": torch.zeros(B, T, dtype=torch.bool), "prompt_mask": torch.zeros(B, T, dtype=torch.bool),
               "old_logprobs": torch.zeros(B, T, dtype=torch.float32)}
        for b, (p, c, lp) in enumerate(seqs):
            P, L = len(p), len(c)
            out["input_ids"][b, :P + L] = torch.cat([p, c])
            out["attention_mask"][b, :P + L] = 1
            out["prompt_mask"][b, :P] = True
            out["loss_mask"][b, P:P + L] = True
            out["old_logprobs"][b, P:P + L] = lp
        out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if not with_logprobs:
            del out["old_logprobs"]
        return out

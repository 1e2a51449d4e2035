"""Online DPO rows: for each prompt, its best and its worst completion as a DPO pair (chosen, rejected).

The score of a completion is its reward minus ``rl.missing_eos_penalty`` when it did not end by itself (it ran
out of ``rl.max_new_tokens``: no eos, end of turn or stop string) — TRL's `OnlineDPOConfig.missing_eos_penalty`,
which keeps a policy from winning pairs with rambling, unfinished answers. Chosen is the first completion with
the highest score, rejected the first with the lowest: two different completions whenever the scores differ.
A group whose scores are all equal (always or never solved) carries no preference: it forms no pair, trains
nothing and is counted as ``tied_groups`` (``pairs``: the pairs formed).

Rows: ``chosen_<key>`` and ``rejected_<key>`` for every key of `RowBuilder.sequences`; a micro-batch holds the
chosen rows, then the rejected rows, trimmed to the longest of both (`data.preference.collate_pairs`' layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Round, RoundRows, RowBuilder


def pair_scores(rewards: torch.Tensor, truncated: torch.Tensor, missing_eos_penalty: float = 0.0) -> torch.Tensor:
    """[B] scores: the reward, minus `missing_eos_penalty` where the completion was `truncated`."""
    return rewards.float() - missing_eos_penalty * truncated.float()


def pick_pairs(scores: torch.Tensor, group: int) -> tuple[list[int], list[int], int]:
    """(chosen rows, rejected rows, tied groups) over groups of `group` adjacent rows (see the module docstring)."""
    chosen, rejected, tied = [], [], 0
    for g in range(len(scores) // group):
        s = scores[g * group:(g + 1) * group]
        if float(s.max()) == float(s.min()):
            tied += 1
            continue
        chosen.append(g * group + int(s.argmax()))
        rejected.append(g * group + int(s.argmin()))
    return chosen, rejected, tied


class PairRows(RowBuilder):
    group_relative = True  # best vs worst of a group
    def units(self, prompts: int, group: int) -> int:
        return prompts

    def truncation_advice(self) -> str | None:
        if getattr(self.ctx.objective, "missing_eos_penalty", 0.0) > 0:
            return None
        return "set online_dpo.missing_eos_penalty (default 0; p > 0 makes a cut completion's score s − p)"

    def build(self, rnd: Round) -> RoundRows:
        scores = pair_scores(rnd.rewards, rnd.truncated, getattr(self.ctx.objective, "missing_eos_penalty", 0.0))
        chosen, rejected, tied = pick_pairs(scores, rnd.group)
        P = len(chosen)
        if not P:  # no pair: one filler pair for the round's empty micro-batches (it trains nothing)
            chosen, rejected = [0], [min(1, len(scores) - 1)]
        rows = self.sequences(rnd.samples, chosen + rejected, with_logprobs=False)
        n = len(chosen)
        rows = {f"{side}{k}": v[sl] for k, v in rows.items()
                for side, sl in (("chosen_", slice(0, n)), ("rejected_", slice(n, 2 * n)))}
        return RoundRows(rows, P, {"tied_groups": tied, "pairs": P})

    def batch(self, rows: dict, idx: torch.Tensor) -> dict:
        c = {k[len("chosen_"):]: v[idx] for k, v in rows.items() if k.startswith("chosen_")}
        j = {k[len("rejected_"):]: v[idx] for k, v in rows.items() if k.startswith("rejected_")}
        width = int(max(c["attention_mask"].sum(-1).max(), j["attention_mask"].sum(-1).max()))
        T = max(c["input_ids"].shape[1], j["input_ids"].shape[1])
        batch = {}
        for k in c:
            fill = self.pad_id if k == "input_ids" else 0
            a = F.pad(c[k], (0, T - c[k].shape[1]), value=fill)
            b = F.pad(j[k], (0, T - j[k].shape[1]), value=fill)
            batch[k] = torch.cat([a, b])[:, :width]
        return batch

"""Rejection-sampling rows: the completions good enough to imitate, as SFT rows (prompt masked).

Only a completion whose reward reaches ``rejection_sampling.keep_threshold`` is kept — for a verifiable 0/1 reward such as
``exact_match`` the default threshold 1.0 means "correct" — so a prompt the policy never solves contributes
nothing, rather than its least bad wrong answer:

``keep: best``       (default) the best completion of each group (the first one on ties), if it reaches the
                     threshold: at most one row per prompt (Llama 2's best-of-N);
``keep: threshold``  every completion that reaches it.

The round's metrics say how many were kept of how many candidates (``kept``, ``kept_of``: groups for best,
completions for threshold, ``kept_fraction``), and every kept completion is appended to ``selected.jsonl`` in the
run directory (round, prompt, completion, reward, origin) so the selected set can be read and reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ...jsonl import read_rows
from .base import Round, RoundRows, RowBuilder


def kept(rewards: torch.Tensor, group: int, keep: str = "best", threshold: float = 1.0) -> list[int]:
    """Indices of the completions kept from `rewards` [B] (groups of `group` adjacent rows), in row order."""
    if keep == "best":
        best = [g * group + int(rewards[g * group:(g + 1) * group].argmax()) for g in range(len(rewards) // group)]
        return [i for i in best if float(rewards[i]) >= threshold]
    return [i for i in range(len(rewards)) if float(rewards[i]) >= threshold]


class BestOfNRows(RowBuilder):
    def units(self, prompts: int, group: int) -> int:
        return prompts * (1 if self.ctx.objective.keep == "best" else group)

    def build(self, rnd: Round) -> RoundRows:
        o = self.ctx.objective  # its keep / keep_threshold options
        keep = kept(rnd.rewards, rnd.group, o.keep, o.keep_threshold)
        candidates = len(rnd.prompts) if o.keep == "best" else len(rnd.rewards)
        # nothing kept: one row stays as the filler of the round's empty micro-batches (it trains nothing)
        rows = self.sequences(rnd.samples, keep or [0], with_logprobs=False)
        self._save_selected([{"round": rnd.index, "prompt": rnd.prompts[i // rnd.group].prompt,
                              "completion": rnd.texts[i], "reward": float(rnd.rewards[i]),
                              "origin": rnd.prompts[i // rnd.group].origin} for i in keep])
        return RoundRows(rows, len(keep), {"kept": len(keep), "kept_of": candidates,
                                           "kept_fraction": len(keep) / max(candidates, 1)})

    def _selected(self) -> str | None:
        return None if self.ctx.run_dir is None or self.ctx.rank else f"{self.ctx.run_dir}/selected.jsonl"

    def _save_selected(self, rows: list[dict]) -> None:
        path = self._selected()
        if path is not None:
            with open(path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    def resume(self, last_round: int) -> None:
        """Forget selections of rounds after the checkpoint (they are sampled again)."""
        path = self._selected()
        if path is None or not os.path.exists(path):
            return
        keep = [r for r in read_rows(Path(path), strict=True) if r.get("round", 0) <= last_round]  # torn row: dropped
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

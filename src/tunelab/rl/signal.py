"""Is a rollout round teaching anything? Group-relative estimators (GRPO, RLOO, Dr. GRPO) give a completion the
advantage r_i − baseline(group), so a prompt group whose G completions all got the same reward has advantages 0:
its loss and gradient are 0 whatever the policy does. A round where every group is like that trains nothing
(only a KL term, when on, moves the weights) — and nothing else says so: the step still logs a loss.

    zero_signal_groups = #{groups g : max_i r_g,i = min_i r_g,i} / #groups

is logged per round (metrics.jsonl, the progress line) for grpo, rloo and online DPO, and `NoSignalWatch` warns
once when ``rl.warn_no_signal_rounds`` rounds in a row were all zero-signal (e.g. a task beyond the model: every
reward 0; or one it has mastered: every reward 1). TRL logs the same quantity as ``frac_reward_zero_std``.
"""

from __future__ import annotations

import torch

from ..console import console


def zero_signal_groups(rewards: torch.Tensor, group: torch.Tensor) -> float:
    """The share of prompt groups (rows with the same `group` index) whose rewards are all equal."""
    ids = group.unique()
    if len(ids) == 0:
        return 0.0
    flat = sum(bool(rewards[group == g].max() == rewards[group == g].min()) for g in ids)
    return flat / len(ids)


class TruncationHint:
    """A reward model scores a completion cut by ``rl.max_new_tokens`` as the unfinished turn it is
    (rl/model_reward.py), with no penalty of its own — and PPO's ``ppo.missing_eot_penalty`` defaults to 0 — so
    nothing tells the policy that running out of tokens is worse than finishing. When a run scores with a reward
    model, a round has cut completions and nothing in the run penalises them (`advice` is None when the row
    builder does, or a ``truncation``/``length_penalty`` reward is weighted), one line says so, once per run."""

    def __init__(self, advice: str | None):
        self.advice, self.given = advice, False

    def round(self, truncated: float) -> None:
        """`truncated`: this round's share of completions that ran out of tokens."""
        if self.advice is None or self.given or truncated <= 0:
            return
        self.given = True
        console.print(f"hint: {truncated:.0%} of this round's completions ran out of rl.max_new_tokens, and the "
                      f"reward model scores them without penalty; to make running out of tokens cost something, "
                      f"{self.advice}", highlight=False, soft_wrap=True)


class NoSignalWatch:
    """Counts consecutive rounds with no reward spread in any group; warns once after `after` of them. Only for
    objectives whose learning signal is that spread — their row builder says ``group_relative`` (grpo/rloo
    advantages, online DPO's best-vs-worst pairs): PPO's baseline is its value model, and rejection sampling learns
    from an all-correct group too."""

    def __init__(self, after: int):
        self.after, self.run, self.warned = after, 0, False

    def round(self, group_relative: bool, rewards: torch.Tensor, group: torch.Tensor) -> dict:
        """This round's ``{"zero_signal_groups": share}`` (empty unless `group_relative`); warns when it is due."""
        if not group_relative:
            return {}
        share = zero_signal_groups(rewards, group)
        self.run = self.run + 1 if share >= 1.0 else 0
        if not self.warned and self.after and self.run >= self.after:
            self.warned = True
            console.print(f"[yellow]warning:[/] no learning signal for {self.run} rounds: in every prompt group "
                          f"all completions got the same reward (mean {float(rewards.mean()):.3f}), so advantages, "
                          "loss and gradient are 0 — the task is too hard (or too easy) for the model: use easier "
                          "prompts, a higher rl.temperature or a larger rl.group_size, or add a partial-credit "
                          "reward", highlight=False, soft_wrap=True)
        return {"zero_signal_groups": share}

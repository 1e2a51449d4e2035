"""The pure parts of a PPO rollout round: sequence scores, per-token rewards with the KL penalty, explained
variance. The round itself — the no-grad forwards (reference log-probs, values), GAE, whitening, the rows — is
PPO's row builder, `rl/rows/ppo.py`; the formulas are in `objectives/ppo.py`.
"""

from __future__ import annotations

from typing import Callable

import torch


def sequence_scores(scores: torch.Tensor, truncated: torch.Tensor, missing_eot_penalty: float = 0.0,
                    normalize: bool = False, clip: float | None = None,
                    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """s' [B]: the reward functions' score minus `missing_eot_penalty` for rows that ran out of tokens
    (`truncated` [B] bool), then — with `normalize` — (s' − mean) / (std + 1e-8) over the round (std unbiased),
    then clipped to [−clip, clip]. `all_sum` (`rl.collective.all_sum`): the round's mean and std are those of
    every rank's rows together."""
    total = all_sum or (lambda t: t)
    s = scores.float() - missing_eot_penalty * truncated.float()
    n = total(torch.tensor(float(s.numel()), dtype=torch.float64))
    if normalize and n > 1:
        mean = total(s.double().sum()) / n
        std = (total(((s.double() - mean) ** 2).sum()) / (n - 1)).sqrt()
        s = ((s.double() - mean) / (std + 1e-8)).float()
    if clip is not None:
        s = s.clamp(-clip, clip)
    return s


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r [B, T]: −β·KL_t on every completion token (`mask`), plus the score s'_i at row i's last one."""
    m = mask.float()
    r = -beta * kl * m
    last = (m * torch.arange(m.shape[1], device=m.device)).argmax(-1)  # index of the last masked token
    has = mask.any(-1)
    r[has, last[has]] += scores[has].to(r.dtype)
    return r


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over the masked tokens (1: V predicts the returns; ≤ 0: no better than a constant)."""
    m = mask.bool()
    v, r = values[m].float(), returns[m].float()
    if r.numel() < 2 or float(r.var()) == 0.0:
        return float("nan")
    return float(1 - (r - v).var() / r.var())

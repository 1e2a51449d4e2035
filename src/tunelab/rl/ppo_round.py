"""One PPO rollout round → training rows: per-token rewards with the KL penalty, values, GAE, whitening.

Called by the rollout source (mode ``ppo``) once per round, after sampling and scoring; the formulas are in
`objectives/ppo.py`. The pure parts are functions here (`sequence_scores`, `token_rewards`,
`explained_variance`); `ppo_rows` runs the no-grad forwards (reference log-probs, values) over the round in
micro-batches and assembles the rows.

Rows (B = prompts_per_step · group_size completions, T = longest prompt + completion), on the CPU:

    input_ids, attention_mask, position_ids, loss_mask, prompt_mask, old_logprobs   as for GRPO (rl/rollout.py)
    ref_logprobs  [B, T] fp32 — log π_ref(y_t) (only when rl.beta > 0)
    old_values    [B, T] fp32 — V_old at each completion token (the value model at the round's start)
    returns       [B, T] fp32 — GAE returns R_t = A_t + V_old,t (the value targets)
    advantages    [B, T] fp32 — GAE advantages, whitened over the round's completion tokens unless switched off
    round         [B]    long — the round index (the objective's approx-KL early stop is per round)
"""

from __future__ import annotations

import torch

from ..objectives.grpo import token_kl
from ..objectives.value import token_values
from ..models.modes import eval_mode
from .advantages import gae, whiten


def sequence_scores(scores: torch.Tensor, truncated: torch.Tensor, missing_eot_penalty: float = 0.0,
                    normalize: bool = False, clip: float | None = None) -> torch.Tensor:
    """s' [B]: the reward functions' score minus `missing_eot_penalty` for rows that ran out of tokens
    (`truncated` [B] bool), then — with `normalize` — (s' − mean) / (std + 1e-8) over the round, then clipped
    to [−clip, clip]."""
    s = scores.float() - missing_eot_penalty * truncated.float()
    if normalize and s.numel() > 1:
        s = (s - s.mean()) / (s.std() + 1e-8)
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


@torch.no_grad()
def _forward_rows(fn, rows: dict, micro: int, device) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "position_ids", "loss_mask", "prompt_mask")
    B = rows["input_ids"].shape[0]
    return torch.cat([fn({k: rows[k][i:i + micro].to(device) for k in keys}).float().cpu()
                      for i in range(0, B, micro)])


def ppo_rows(rows: dict, rewards: torch.Tensor, truncated: torch.Tensor, model, objective, cfg, round_: int,
             micro: int) -> tuple[dict, dict]:
    """(rows with ref_logprobs/old_values/returns/advantages/round, round metrics) — see the module docstring."""
    p, rl = cfg.ppo, cfg.rl
    device = next(model.parameters()).device
    mask = rows["loss_mask"].clone()
    mask[:, 0] = False
    beta = objective.kl.value
    # step 1. the reference's log-probs and the KL of the sampling policy to it, per token
    if p.beta > 0 and objective.reference is not None:
        rows["ref_logprobs"] = _forward_rows(
            lambda b: objective.reference.token_logprobs(b, temperature=rl.temperature), rows, micro, device)
        kl = token_kl(rows["old_logprobs"], rows["ref_logprobs"], p.kl_estimator) * mask
    else:
        kl = torch.zeros_like(rows["old_logprobs"])
    # step 2. per-token rewards: −β·KL, the (penalised, normalised, clipped) score at the last token
    scores = sequence_scores(rewards, truncated, p.missing_eot_penalty, p.reward_norm, p.reward_clip)
    r = token_rewards(scores, kl, mask, beta)
    # step 3. the value model's estimates at the round's start, then GAE and whitening
    with eval_mode(model):
        values = _forward_rows(lambda b: token_values(model, b), rows, micro, device) * mask
    adv, returns = gae(r, values, mask, p.gamma, p.lam)
    if p.whiten_advantages:
        adv = whiten(adv, mask) * mask
    rows.update(old_values=values, returns=returns, advantages=adv,
                round=torch.full((rows["input_ids"].shape[0],), round_, dtype=torch.long))
    m = mask.float()
    tokens = m.sum().clamp(min=1)
    seq_kl = (kl * m).sum(-1)
    metrics = {"kl": float((kl * m).sum() / tokens), "kl_seq": float(seq_kl.mean()), "kl_coef": beta,
               "score": float(scores.mean()), "non_score_reward": float(-beta * seq_kl.mean()),
               "entropy_sampled": float(-(rows["old_logprobs"] * m).sum() / tokens),  # −E log π_old(y): sampled estimate
               "explained_variance": explained_variance(values, returns, mask),
               "value_old_mean": float((values * m).sum() / tokens), "return_mean": float((returns * m).sum() / tokens),
               "advantage_abs": float((adv.abs() * m).sum() / tokens)}
    # step 4. the adaptive KL controller sees this round's KL (β for the next round)
    objective.kl.update(float(seq_kl.mean()), int(rows["input_ids"].shape[0]))
    return rows, metrics

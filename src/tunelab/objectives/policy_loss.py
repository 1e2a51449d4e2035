"""The per-token pieces of online RL's policy loss, as pure tensor functions (the objectives wire them in).

Notation: row i is one sampled completion y_i, t one of its tokens (`mask` [B, T] bool marks the completion
tokens scored), log π_θ(y_t) the trainer's log-prob with gradient, log π_old(y_t) the log-prob of the policy
that sampled the row, A the advantage (one per row [B], GRPO; or one per token [B, T], PPO).

``clipped_pg`` — PPO's clipped surrogate per token (Schulman et al. 2017, arXiv:1707.06347), with DAPO's
asymmetric clip ε_high ("clip-higher", Yu et al. 2025, arXiv:2503.14476, §3.1):

    ρ_t  = exp(log π_θ(y_t) − log π_old(y_t))
    pg_t = − min(ρ_t·A,  clip(ρ_t, 1 − ε_low, 1 + ε_high)·A)

``sequence_ratio`` / ``gspo_pg`` — GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization",
arXiv:2507.18071): one importance ratio per completion, the geometric mean of its token ratios,

    s_i = exp( (1/|y_i|) Σ_t (log π_θ(y_t) − log π_old(y_t)) )
    pg_i = − min(s_i·A_i,  clip(s_i, 1 − ε_low, 1 + ε_high)·A_i)      applied to every token t of row i

so the clip acts on whole sequences (the paper's ε is small: 3e-4 / 4e-4). GSPO-token (the same paper) keeps one
ratio per token with the sequence's value and its own token's gradient:

    s_i,t = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]

— equal to s_i in value; with one advantage per row (GRPO) the gradient equals GSPO's, and it admits
per-token advantages. TRL 1.16 implements GSPO as ``importance_sampling_level="sequence"`` (its ratio and
clipping are the ones here; the tests compare the losses on identical inputs).

``overlong_mask`` — DAPO's overlong filtering (Yu et al. 2025, §3.4): completions cut by ``max_new_tokens``
(no end of turn) are dropped from the loss, so a reasoning chain that was merely too long is not punished as if
wrong: mask_t ← mask_t · [row i finished]. TRL: ``mask_truncated_completions=True``.

``entropy_bonus`` — −c_H · H_t per token, H_t = −Σ_v π_θ(v|y_<t) log π_θ(v|y_<t) of the whole next-token
distribution at the sampling temperature (with gradient); added to ℓ_t it maximises entropy (Mnih et al.
2016, A3C; Schulman et al. 2017, eq. 9's c₂·S term). TRL 1.16: ``entropy_coef``.

``mismatch`` — the train–inference mismatch on the sampled tokens: the sampler's log-probs (the inference
engine that generated the rows) against the trainer's forward of the *same weights* on the same tokens:

    mismatch_kl           = mean_t [ log π_sampler(y_t) − log π_trainer(y_t) ]   (k1 estimate of
                            KL(π_sampler ‖ π_trainer): the tokens were drawn from the sampler)
    mismatch_max_abs_logp = max_t | log π_sampler(y_t) − log π_trainer(y_t) |

Under torchrun both are over every rank's tokens (the token mean a global one, the max a true max: callers
pass `all_sum` / `all_max`, rl/collective.py). Both are 0 when the two forwards agree; kernels, batch shapes,
KV-cache precision and (with a separate inference engine) weight synchronisation make them differ (Yao et al.
2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", 2025 blog post; verl logs a
similar sampler-vs-trainer probability difference).
"""

from __future__ import annotations

from typing import Callable

import torch


def clipped_pg(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2,
               eps_high: float | None = None):
    """(pg [B, T], ratio [B, T], clipped [B, T] bool): −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) per token;
    `advantages` one per row [B] (GRPO) or one per token [B, T] (PPO). `clipped`: the clip cuts the gradient
    (ρ < 1−ε_low with A < 0, or ρ > 1+ε_high with A > 0)."""
    eps_high = eps_low if eps_high is None else eps_high
    A = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    pg = -torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
    return pg, ratio, clipped


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                   per_token: bool = False) -> torch.Tensor:
    """GSPO's ratio: s_i = exp(mean over row i's masked tokens of log π_θ − log π_old), as [B, 1] (broadcasts
    over tokens); `per_token`: GSPO-token's [B, T] ratio sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)] (same values)."""
    m = mask.to(logp.dtype)
    log_s = ((logp - old_logp) * m).sum(-1) / m.sum(-1).clamp(min=1)
    if not per_token:
        return torch.exp(log_s).unsqueeze(-1)
    return torch.exp(log_s.detach().unsqueeze(-1) + logp - logp.detach())


def gspo_pg(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
            eps_low: float, eps_high: float | None = None, per_token: bool = False):
    """(pg [B, T], ratio [B, T], clipped [B, T] bool) of GSPO (``per_token``: GSPO-token); see the module doc."""
    eps_high = eps_low if eps_high is None else eps_high
    A = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
    s = sequence_ratio(logp, old_logp, mask, per_token).expand_as(logp)
    pg = -torch.min(s * A, torch.clamp(s, 1 - eps_low, 1 + eps_high) * A)
    clipped = ((s < 1 - eps_low) & (A < 0)) | ((s > 1 + eps_high) & (A > 0))
    return pg, s, clipped


def overlong_mask(mask: torch.Tensor, truncated: torch.Tensor | None) -> torch.Tensor:
    """DAPO overlong filtering: `mask` [B, T] with the rows of truncated completions (`truncated` [B] bool) off."""
    if truncated is None:
        return mask
    return mask & ~truncated.to(device=mask.device, dtype=torch.bool).unsqueeze(-1)


def entropy_bonus(entropy: torch.Tensor, coef: float) -> torch.Tensor:
    """The per-token term −c_H · H_t to add to ℓ_t (`entropy` [B, T] with gradient)."""
    return -coef * entropy


def mismatch(sampler_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor,
             all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
             all_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """{mismatch_kl, mismatch_max_abs_logp} over the masked tokens (see the module doc); zeros for no token.
    `all_sum` / `all_max` reduce over the ranks of a data-parallel run, so both are over every rank's tokens."""
    total, top = all_sum or (lambda t: t), all_max or (lambda t: t)
    m = mask.bool()
    d = (sampler_logp.double() - trainer_logp.double())[m]
    n = float(total(torch.tensor(float(d.numel()), dtype=torch.float64)))
    kl = float(total(d.sum()) / n) if n else 0.0
    largest = float(top(d.abs().max() if d.numel() else torch.tensor(0.0, dtype=torch.float64)))
    return {"mismatch_kl": kl, "mismatch_max_abs_logp": largest}

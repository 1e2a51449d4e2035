"""Advantage estimators: pure tensor functions from per-completion rewards to per-completion advantages.

Outcome rewards (one scalar per completion) for G completions sampled per prompt. Notation: a *group* is the G
completions of one prompt, r_i the reward of completion i, r̄_g and s_g the mean and standard deviation of the
rewards of i's group g. Every estimator takes

    rewards      [B] float — one reward per completion (finite)
    group_index  [B] int   — the group (prompt) of each row, any integer labels; or instead
    group_size   G         — rows of a group adjacent: rows [k·G, (k+1)·G) are group k (what `sampling.sample`
                             returns with n = G); B must be a multiple of G

and returns advantages [B] in the rewards' float dtype (float32 for integer rewards). `ESTIMATORS` maps a name
to the function (the rollout source picks one by the objective's `advantage` option, e.g. `grpo.advantage`);
`compute(name, rewards, ...)` looks it up.
Groups may differ in size when `group_index` is given.

``grpo``     GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, §4.1.2, outcome supervision):

                 A_i = (r_i − r̄_g) / (s_g + ε)        ε = 1e-6 (verl's default; TRL 1.16 adds 1e-4)

             s_g is the *unbiased* (Bessel-corrected, ÷(G−1)) standard deviation, as `torch.std` and TRL's
             GRPOTrainer (`nanstd`) and verl compute it. `scale_by_std=False` drops the division (= dr_grpo).
``dr_grpo``  Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783, §3.1):

                 A_i = r_i − r̄_g

             dividing by s_g weights prompts by how (in)consistently they are solved — a question-level
             difficulty bias; TRL's ``scale_rewards="none"``.
``rloo``     REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740, eq. 5;
             Kool et al. 2019): the baseline of completion i is the mean of the *other* G − 1 of its group,

                 A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j  =  G/(G−1) · (r_i − r̄_g)

             unbiased (the baseline does not depend on r_i); needs G ≥ 2 (a clear error otherwise).

``reinforce_pp``  REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
             Language Models", arXiv:2501.03262): no critic, no group baseline — the rewards are
             normalised over the *whole batch* (the round's B completions):

                 A_i = (r_i − μ_B) / sqrt(σ²_B + ε)

             with μ_B, σ²_B the mean and unbiased variance over the batch's *tokens*: completion i counts n_i
             times (its completion tokens; `token_counts`), as verl's ``masked_whiten`` over the token-level
             returns does (``compute_reinforce_plus_plus_outcome_advantage``; OpenRLHF ``reinforce`` likewise
             normalises over action tokens). With an outcome reward, γ = 1 and the KL kept in the loss rather
             than in the reward, every token of completion i has return r_i, hence the weights n_i. Without
             `token_counts` every completion counts once.
``reinforce_pp_baseline``  REINFORCE++-baseline (the same paper; OpenRLHF ``reinforce_baseline``): the
             group mean first, then the batch normalisation:

                 A_i = (d_i − μ_B(d)) / sqrt(σ²_B(d) + ε),    d_i = r_i − r̄_g   (token-weighted as above)

Under torchrun the batch is the whole round, every rank's rows: the builder passes ``all_sum``
(`rl.collective.all_sum`) to the estimators listed in `BATCH_WIDE`, so μ_B and σ_B are those of all ranks' rows
together and N ranks × b rows get the advantages of one process with N·b (verl and OpenRLHF normalise the global
batch). The group estimators need nothing: a group never straddles ranks.

Groups whose rewards are all equal (a prompt always or never solved) get advantage 0 everywhere: they carry no
learning signal. A group of one has r_i = r̄_g, so advantage 0 under grpo and dr_grpo (as in TRL; verl instead
passes the raw reward through).

`whiten(x, mask, shift_mean)`: batch normalisation (x − μ) / sqrt(σ² + 1e-8) over the masked entries, σ² the
unbiased variance, as verl's `masked_whiten` (and TRL's former `trl.core.masked_whiten`) — for PPO/GAE
advantages, or to normalise advantages over a whole batch. (TRL's ``scale_rewards="batch"`` is a different
thing: (r_i − r̄_g) / (std of all rewards + 1e-4), not offered here.)

`gae(rewards, values, mask, gamma, lam)`: per-token advantages of PPO (Schulman et al. 2016, "High-Dimensional
Continuous Control Using Generalized Advantage Estimation", arXiv:1506.02438, eq. 16) over [B, T] token-level
rewards and value estimates, the completion tokens of each row contiguous (`mask`):

    δ_t = r_t + γ·V_{t+1} − V_t          (V_{t+1} = 0 after the last completion token: the episode ends)
    A_t = δ_t + γλ·A_{t+1}               returns R_t = A_t + V_t   (the value loss's targets)

γ = 1, λ = 0.95 are the RLHF defaults (TRL's PPOTrainer, Xu et al. 2024). Not an `ESTIMATORS` entry: it needs
values per token, not one reward per completion.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import TunelabError


def _float(rewards: torch.Tensor) -> torch.Tensor:
    r = torch.as_tensor(rewards)
    if r.dim() != 1:
        raise ValueError(f"advantages: rewards must be one scalar per completion, [B]; got shape {tuple(r.shape)}")
    if not torch.is_floating_point(r):
        r = r.float()
    if torch.isnan(r).any():
        raise TunelabError("advantages: some rewards are NaN or infinite; a reward function must return a number "
                           "for every completion")
    if not torch.isfinite(r).all():  # ±1e308 is a finite float, but not a float32 one: it arrives here as ±inf
        raise TunelabError(f"advantages: some rewards are infinite or beyond {r.dtype}'s range "
                           f"(±{torch.finfo(r.dtype).max:.2g}); scale the rewards down")
    return r


def groups(rewards: torch.Tensor, group_index=None, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse [B] long: each row's group as 0..K−1, counts [K] long) from `group_index` or `group_size`."""
    B = rewards.shape[0]
    if (group_index is None) == (group_size is None):
        raise ValueError("advantages: give exactly one of group_index ([B] group ids) or group_size (G)")
    if group_size is not None:
        G = int(group_size)
        if G < 1 or B % G:
            raise TunelabError(f"advantages: {B} rewards do not split into groups of {G} adjacent completions")
        inverse = torch.arange(B, device=rewards.device) // G
        return inverse, torch.full((B // G,), G, dtype=torch.long, device=rewards.device)
    index = torch.as_tensor(group_index, device=rewards.device)
    if index.shape != rewards.shape:
        raise ValueError(f"advantages: group_index has shape {tuple(index.shape)}, rewards {tuple(rewards.shape)}")
    _, inverse = torch.unique(index, return_inverse=True)
    return inverse, torch.bincount(inverse)


def group_stats(rewards: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor):
    """Per-row group mean and unbiased group std ([B] each; std 0 for a group of one)."""
    K = counts.shape[0]
    n = counts.to(rewards.dtype)
    mean = torch.zeros(K, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards) / n
    dev2 = (rewards - mean[inverse]) ** 2
    ss = torch.zeros(K, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, dev2)
    std = torch.where(counts > 1, ss / (n - 1).clamp(min=1), torch.zeros_like(ss)).sqrt()
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):  # finite rewards, overflowing statistics
        raise TunelabError(f"advantages: the rewards' group mean or spread overflows {rewards.dtype} (largest "
                           f"|reward| {float(rewards.abs().max()):.3g}); scale the rewards down")
    return mean[inverse], std[inverse]


def grpo(rewards: torch.Tensor, group_index=None, *, group_size: int | None = None, eps: float = 1e-6,
         scale_by_std: bool = True) -> torch.Tensor:
    """GRPO: A_i = (r_i − r̄_g) / (s_g + ε), s_g the unbiased group std (Shao et al. 2024, arXiv:2402.03300).

    `scale_by_std=False`: A_i = r_i − r̄_g (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783)."""
    r = _float(rewards)
    inverse, counts = groups(r, group_index, group_size)
    mean, std = group_stats(r, inverse, counts)
    adv = r - mean
    return adv / (std + eps) if scale_by_std else adv


def dr_grpo(rewards: torch.Tensor, group_index=None, *, group_size: int | None = None) -> torch.Tensor:
    """Dr. GRPO: A_i = r_i − r̄_g, no std scaling (Liu et al. 2025, "Understanding R1-Zero-Like Training",
    arXiv:2503.20783)."""
    return grpo(rewards, group_index, group_size=group_size, scale_by_std=False)


def rloo(rewards: torch.Tensor, group_index=None, *, group_size: int | None = None) -> torch.Tensor:
    """RLOO: A_i = r_i − mean_{j≠i} r_j = G/(G−1)·(r_i − r̄_g) (Ahmadian et al. 2024, arXiv:2402.14740).

    Raises TunelabError for a group of one completion (no other completion to form the baseline)."""
    r = _float(rewards)
    inverse, counts = groups(r, group_index, group_size)
    if (counts < 2).any():
        raise TunelabError("rloo needs at least 2 completions per prompt for its leave-one-out baseline "
                           f"(rl.group_size ≥ 2); got a group of {int(counts.min())}")
    mean, _ = group_stats(r, inverse, counts)
    G = counts.to(r.dtype)[inverse]
    return G / (G - 1) * (r - mean)


def _batch_norm(x: torch.Tensor, eps: float, all_sum: Callable[[torch.Tensor], torch.Tensor] | None,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """(x − μ) · rsqrt(σ² + eps): μ and σ² (unbiased) the `weights`-weighted mean and variance over every entry —
    of every rank with `all_sum` — in float64. Weight n_i = entry i repeated n_i times, so with completion token
    counts this is verl's ``masked_whiten`` of the broadcast [B, T] returns. Zeros when the total weight is < 2."""
    total = all_sum or (lambda t: t)
    xd = x.double()
    w = torch.ones_like(xd) if weights is None else weights.to(xd.device).double()
    n = float(total(w.sum()))
    if n < 2:
        return torch.zeros_like(x)
    mean = total((w * xd).sum()) / n
    var = total((w * (xd - mean) ** 2).sum()) / (n - 1)
    return ((xd - mean) * torch.rsqrt(var + eps)).to(x.dtype)


def reinforce_pp(rewards: torch.Tensor, group_index=None, *, group_size: int | None = None, eps: float = 1e-8,
                 all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 token_counts: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE++: A_i = (r_i − μ_B) / sqrt(σ²_B + ε) over the batch's tokens (Hu 2025, arXiv:2501.03262; verl's
    token-level whitening): `token_counts` [B] weights completion i by its n_i tokens (None: by 1). The groups
    are validated but not used. `all_sum` (`rl.collective.all_sum`): the batch is every rank's rows."""
    r = _float(rewards)
    groups(r, group_index, group_size)
    return _batch_norm(r, eps, all_sum, token_counts)


def reinforce_pp_baseline(rewards: torch.Tensor, group_index=None, *, group_size: int | None = None,
                          eps: float = 1e-8, all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          token_counts: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE++-baseline: d_i = r_i − r̄_g, then A_i = (d_i − μ_B(d)) / sqrt(σ²_B(d) + ε) over the batch's
    tokens as `reinforce_pp` (every rank's rows with `all_sum`; the group mean needs no collective: a group lives
    on one rank). verl ``compute_reinforce_plus_plus_baseline_outcome_advantage``."""
    return _batch_norm(dr_grpo(rewards, group_index, group_size=group_size), eps, all_sum, token_counts)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8, all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x − μ) / sqrt(σ² + eps) with μ, σ² the mean and unbiased variance of the entries where `mask` is true
    (all entries without a mask); `shift_mean=False` adds μ back (rescale only). As verl's `masked_whiten`.
    Entries outside the mask are transformed too (callers mask them later).
    `all_sum`: sums a tensor over the ranks of a data-parallel run (`rl.collective.all_sum`), so μ and σ² are
    those of every rank's masked entries together. Needs at least 2 masked entries (over all ranks)."""
    total = all_sum or (lambda t: t)
    xf = x if torch.is_floating_point(x) else x.float()
    m = torch.ones_like(xf, dtype=torch.bool) if mask is None else mask.bool()
    n = total(m.sum())
    if int(n) < 2:
        raise ValueError(f"whiten: need at least 2 entries to estimate a variance; got {int(n)}")
    mf = m.to(xf.dtype)
    mean = total((xf * mf).sum()) / n
    var = total((((xf - mean) ** 2) * mf).sum()) / (n - 1)
    out = (xf - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, T], returns [B, T]) by GAE(γ, λ) over the tokens where `mask` [B, T] is true (contiguous per
    row; 0 elsewhere). `rewards` and `values` [B, T] float; entries off the mask are ignored."""
    m = mask.to(values.dtype)
    r, v = rewards.to(values.dtype) * m, values * m
    adv = torch.zeros_like(v)
    next_v = torch.zeros_like(v[:, 0])
    next_a = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        adv[:, t] = (delta + gamma * lam * next_a) * m[:, t]
        next_v, next_a = v[:, t], adv[:, t]  # both 0 off the mask: the row's episode ends at its last token
    return adv, (adv + v) * m


ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo,
                                                      "reinforce_pp": reinforce_pp,
                                                      "reinforce_pp_baseline": reinforce_pp_baseline}
BATCH_WIDE = frozenset({"reinforce_pp", "reinforce_pp_baseline"})  # normalise over the whole batch: take all_sum


def compute(name: str, rewards: torch.Tensor, group_index=None, *, group_size: int | None = None,
            **options) -> torch.Tensor:
    """`ESTIMATORS[name](rewards, group_index, group_size=..., **options)`, with one clear error for a bad name."""
    if name not in ESTIMATORS:
        raise TunelabError(f"unknown advantage estimator {name!r}; choose {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name](rewards, group_index, group_size=group_size, **options)

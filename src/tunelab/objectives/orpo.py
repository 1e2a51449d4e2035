"""ORPO: monolithic preference optimization without a reference model (Hong et al. 2024, arXiv:2403.07691).

With the per-token average likelihood P̄(y) = exp(L_θ(y)/|y|) and odds(y) = P̄(y) / (1 − P̄(y)):

    log OR = log odds(y⁺) − log odds(y⁻)
           = (ā⁺ − ā⁻) − (log(1 − e^{ā⁺}) − log(1 − e^{ā⁻})),        ā = L_θ(y)/|y| ≤ 0
    L      = NLL(y⁺) − λ·log σ(log OR),          NLL(y⁺) = −ā⁺,  λ = 0.1

log(1 − eˣ) is computed stably as log1mexp (Mächler 2012): log(−expm1(x)) for x > −ln 2, log1p(−eˣ) below,
so neither branch cancels catastrophically. ā is clamped just below 0: at exactly 0 the odds are infinite and
the gradient would be NaN. The NLL is the per-pair token mean (TRL averages over all chosen tokens of a batch;
equal when the chosen lengths are equal). Reference implementation: TRL `ORPOTrainer.odds_ratio_loss`, which
the tests compare against. Rewards for metrics are λ·ā, as TRL logs them. No reference model is built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .pairwise import PairwiseObjective


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation on either side of −ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(ac: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    ac, ar = ac.clamp(max=-1e-6), ar.clamp(max=-1e-6)
    return (ac - ar) - (log1mexp(ac) - log1mexp(ar))


def orpo_losses(ac, ar, lam: float = 0.1):
    """Per-pair ORPO loss from per-token average log-probs; returns (loss, log OR)."""
    lor = log_odds_ratio(ac, ar)
    return -ac - lam * F.logsigmoid(lor), lor


class ORPO(PairwiseObjective):
    name = "orpo"
    needs_reference = False
    default_beta = 0.1  # λ

    def pair_losses(self, lc, lr, nc, nr, rc, rr, batch):
        ac, ar = lc / nc, lr / nr
        losses, lor = orpo_losses(ac, ar, self.beta)
        extra = {"log_odds_ratio": float(lor.detach().mean()), "nll": float(-ac.detach().mean())}
        return losses, self.beta * ac, self.beta * ar, extra

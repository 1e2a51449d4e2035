"""Direct Preference Optimization and its loss variants (one objective, ``dpo.loss`` picks the formula).

With Δ(y) = L_θ(y) − L_ref(y), h = Δ(y⁺) − Δ(y⁻) and ε = ``dpo.label_smoothing``:

``sigmoid``  DPO (Rafailov et al. 2023, arXiv:2305.18290):          −log σ(βh),  β = 0.1
``ipo``      IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17):     (h̄ − 1/(2τ))², τ = β
             with per-token averaged log-ratios h̄ = Δ(y⁺)/|y⁺| − Δ(y⁻)/|y⁻| (TRL's normalisation, confirmed
             by the IPO authors; the squared loss otherwise grows with response length)
``cdpo``     conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):
             −(1−ε) log σ(βh) − ε log σ(−βh)     (labels flipped with probability ε)
``robust``   robust DPO (Chowdhury et al. 2024, arXiv:2403.00409): unbiased under flip rate ε,
             [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)
``hinge``    SLiC-style hinge (Zhao et al. 2023, arXiv:2305.10425): max(0, 1 − βh)

Implicit rewards (metrics): β·Δ(y). Reference implementation: TRL `DPOTrainer._compute_loss` (tests compare
on identical log-probs). An optional SFT term on y⁺ is mixed in by `dpo.sft_weight` (RPO; see pairwise.py).
Options: the ``dpo:`` section (`DPOOptions`).
"""

from __future__ import annotations

import typing
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .pairwise import PairwiseObjective, PairwiseOptions

Loss = Literal["sigmoid", "ipo", "cdpo", "robust", "hinge"]
LOSSES = typing.get_args(Loss)


class DPOOptions(PairwiseOptions):
    """The ``dpo:`` section (online_dpo's extends it)."""

    moved_from: ClassVar[dict[str, str]] = {"pref.beta": "beta", "pref.loss": "loss",
                                            "pref.label_smoothing": "label_smoothing"}

    loss: Loss = "sigmoid"
    beta: float = Field(0.1, gt=0)  # β (τ for ipo)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # ε of cdpo/robust


def dpo_losses(lc, lr, rc, rr, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0,
               nc=None, nr=None) -> torch.Tensor:
    """Per-pair loss from policy (lc, lr) and reference (rc, rr) sequence log-probs; nc/nr = lengths (IPO)."""
    h = (lc - rc) - (lr - rr)
    eps = label_smoothing
    if loss == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss == "cdpo":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss == "hinge":
        return torch.relu(1 - beta * h)
    if loss == "ipo":
        hbar = (lc - rc) / nc - (lr - rr) / nr
        return (hbar - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss!r}; choose {', '.join(LOSSES)}")


class DPO(PairwiseObjective):
    name = "dpo"
    Options = DPOOptions

    @classmethod
    def from_config(cls, cfg, reference=None):
        o = cls.options(cfg)
        return cls(o.beta, loss=o.loss, label_smoothing=o.label_smoothing, reference=reference,
                   sft_weight=o.sft_weight, chunk_size=cfg.train.loss_chunk_size)

    def __init__(self, beta=None, loss: str = "sigmoid", label_smoothing: float = 0.0, **kw):
        super().__init__(beta, **kw)
        if loss not in LOSSES:
            raise ValueError(f"unknown DPO loss {loss!r}; choose {', '.join(LOSSES)}")
        self.loss_type, self.label_smoothing = loss, label_smoothing

    def pair_losses(self, lc, lr, nc, nr, rc, rr, batch):
        losses = dpo_losses(lc, lr, rc, rr, self.beta, self.loss_type, self.label_smoothing, nc, nr)
        return losses, self.beta * (lc - rc), self.beta * (lr - rr), {}

"""KTO: Kahneman–Tversky Optimization on unpaired data (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7).

Each example is (x, y, label): y is desirable (label true) or undesirable. With r = Δ(y) = L_θ(y) − L_ref(y):

    z0 = max(0, mean_batch[ L_θ(y'|x) − L_ref(y'|x) ])      detached; y' = a mismatched completion
    desirable:    λ_D · (1 − σ(β·(r − z0)))
    undesirable:  λ_U · (1 − σ(β·(z0 − r)))               β = 0.1, λ_D = λ_U = 1

z0 is the batch estimate of KL(π_θ ‖ π_ref) from *mismatched* prompt/completion pairs (x_i, y_{i−1}): the paper
and TRL use mismatched pairs so the estimate does not move with the very rewards being optimised. The partner is
fixed per example in dataset order (`data.preference.encode_unpaired`), so its reference log-prob can be
cached like the others. The policy side of z0 runs without gradients (it is detached anyway).

Weights: the paper recommends λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3] (§4.2; TRL warns likewise); `weight_warning`
says so when the data's desirable/undesirable balance makes the weighting fall outside that range.
The loss is the SUM over examples with n = number of examples (TRL takes the mean), so accumulation is exact.
Reference implementation: TRL `KTOTrainer._compute_loss` (loss_type="kto"), which the tests compare against.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from ..config import Strict
from ..console import console
from .base import RunHooks
from .logprobs import sequence_logprobs, token_logprobs
from .pairwise import PairMetrics
from .reference import ReferenceHooks, view


def kto_losses(logps, ref_logps, labels, z0, beta: float = 0.1, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> torch.Tensor:
    r = logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(labels.bool(), desirable, undesirable)


def kto_z0(kl_logps, ref_kl_logps) -> torch.Tensor:
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def weight_warning(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                   undesirable_weight: float = 1.0) -> str | None:
    """A warning when λ_D·n_D / (λ_U·n_U) is outside the paper's [1, 4/3] (None when fine or undefined)."""
    if not n_desirable or not n_undesirable:
        return (f"KTO data has only {'desirable' if n_desirable else 'undesirable'} examples; the loss then only "
                "pushes one way (consider adding the other kind)") if (n_desirable or n_undesirable) else None
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return None
    lo = n_undesirable * undesirable_weight / n_desirable
    return (f"KTO weighting is imbalanced: λ_D·n_D / (λ_U·n_U) = {desirable_weight}·{n_desirable} / "
            f"({undesirable_weight}·{n_undesirable}) = {ratio:.2f}, outside the recommended [1, 4/3]; "
            f"try kto.desirable_weight in [{lo:.2f}, {lo * 4 / 3:.2f}]")


class KTOOptions(Strict):
    """The ``kto:`` section."""

    moved_from: ClassVar[dict[str, str]] = {"pref.beta": "beta", "pref.desirable_weight": "desirable_weight",
                                            "pref.undesirable_weight": "undesirable_weight"}

    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)  # λ_D
    undesirable_weight: float = Field(1.0, gt=0)  # λ_U


class KTO(PairMetrics, ReferenceHooks, RunHooks):
    name = "kto"
    data_kind = "unpaired"
    needs_reference = True
    default_beta = 0.1
    Options = KTOOptions

    @classmethod
    def from_config(cls, cfg, reference=None):
        o = cls.options(cfg)
        return cls(o.beta, o.desirable_weight, o.undesirable_weight, reference=reference,
                   chunk_size=cfg.train.loss_chunk_size)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.train.batch_size < 2:
            console.print("[yellow]kto with train.batch_size=1: the KL estimate z0 uses a single mismatched pair[/]")

    @classmethod
    def check_data(cls, stats: dict, cfg) -> None:
        o = cls.options(cfg)
        warning = weight_warning(stats["n_desirable"], stats["n_undesirable"], o.desirable_weight,
                                 o.undesirable_weight)
        if warning:
            console.print(f"[yellow]warning: {warning}[/]")

    def __init__(self, beta: float | None = None, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference=None, chunk_size: int = 1024):
        self.beta = self.default_beta if beta is None else beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.reference, self.chunk_size = reference, chunk_size

    def _logps(self, model, batch):
        return sequence_logprobs(token_logprobs(model, batch, self.chunk_size), batch)[0]

    def loss(self, model, batch: dict):
        if "ref_logps" in batch:
            ref, ref_kl = batch["ref_logps"].float(), batch["ref_kl_logps"].float()
        else:
            ref, ref_kl = self.reference.logps(batch), self.reference.logps(batch, "kl_")
        with torch.no_grad():
            z0 = kto_z0(self._logps(model, view(batch, "kl_")), ref_kl)
        logps = self._logps(model, batch)
        labels = batch["label"].bool()
        losses = kto_losses(logps, ref, labels, z0, self.beta, self.desirable_weight, self.undesirable_weight)
        rewards = self.beta * (logps.detach() - ref)
        m = {"kl_ref": float(z0), "n_desirable": float(labels.sum())}
        if labels.any():
            m.update(reward_chosen=float(rewards[labels].mean()), logp_chosen=float(logps.detach()[labels].mean()))
        if (~labels).any():
            m.update(reward_rejected=float(rewards[~labels].mean()),
                     logp_rejected=float(logps.detach()[~labels].mean()))
        if labels.any() and (~labels).any():
            m["reward_margin"] = m["reward_chosen"] - m["reward_rejected"]
        return losses.sum(), torch.tensor(len(labels), device=losses.device), m

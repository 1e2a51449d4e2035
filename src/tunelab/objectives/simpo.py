"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al. 2024, arXiv:2405.14734).

    L = −log σ( β·(L_θ(y⁺)/|y⁺| − L_θ(y⁻)/|y⁻|) − γ ),      β = 2.0, γ/β = 0.5 (so γ = 1.0)

The reward is the length-normalised log-likelihood β·L_θ(y)/|y| (no reference model: none is built or
loaded), and γ is a target reward margin. With ``simpo.label_smoothing`` ε > 0 the conservative form
−(1−ε) log σ(z) − ε log σ(−z) of the reference code is used. No NLL term unless ``simpo.sft_weight`` > 0 (CPO's
``cpo_alpha``). Defaults: β = 2.0 and γ/β = 0.5, the values of the reference repo's Llama-3-8B-base recipe
(princeton-nlp/SimPO ``training_configs/llama-3-8b-base-simpo.yaml``); its ``SimPOConfig`` dataclass defaults to
γ/β = 0.25 (β = 2.0). TRL implements the
same loss as `CPOTrainer(loss_type="simpo")`, which the tests compare against.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from pydantic import Field

from .pairwise import PairwiseObjective, PairwiseOptions


class SimPOOptions(PairwiseOptions):
    """The ``simpo:`` section."""

    moved_from: ClassVar[dict[str, str]] = {"pref.beta": "beta", "pref.gamma_beta_ratio": "gamma_beta_ratio",
                                            "pref.label_smoothing": "label_smoothing"}

    beta: float = Field(2.0, gt=0)
    gamma_beta_ratio: float = Field(0.5, ge=0.0)  # γ/β
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # ε of the conservative form


def simpo_losses(ac, ar, beta: float = 2.0, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0):
    """Per-pair loss from per-token average log-probs ac = L(y⁺)/|y⁺|, ar = L(y⁻)/|y⁻|."""
    z = beta * (ac - ar) - gamma_beta_ratio * beta
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


class SimPO(PairwiseObjective):
    name = "simpo"
    needs_reference = False
    default_beta = 2.0
    Options = SimPOOptions

    @classmethod
    def from_config(cls, cfg, reference=None):
        o = cls.options(cfg)
        return cls(o.beta, gamma_beta_ratio=o.gamma_beta_ratio, label_smoothing=o.label_smoothing,
                   sft_weight=o.sft_weight, chunk_size=cfg.train.loss_chunk_size)

    def __init__(self, beta=None, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0, **kw):
        super().__init__(beta, **kw)
        self.gamma_beta_ratio, self.label_smoothing = gamma_beta_ratio, label_smoothing

    def pair_losses(self, lc, lr, nc, nr, rc, rr, batch):
        ac, ar = lc / nc, lr / nr
        losses = simpo_losses(ac, ar, self.beta, self.gamma_beta_ratio, self.label_smoothing)
        return losses, self.beta * ac, self.beta * ar, {}

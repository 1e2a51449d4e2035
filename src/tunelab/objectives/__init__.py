"""Training objectives: `Objective.loss(model, batch) -> (loss_sum, n, metrics)` (see base.py).

`build_objective(cfg)` maps a RunConfig's ``objective`` and ``pref`` section to an instance:

=========  ==========================  ===============  =================
objective  module                      data             reference model
=========  ==========================  ===============  =================
sft        sft.SFT                     any SFT format   —
dpo        dpo.DPO (pref.loss: sigmoid/ipo/cdpo/robust/hinge)  pairs  yes
simpo      simpo.SimPO                 pairs            none (reference-free)
orpo       orpo.ORPO                   pairs            none (reference-free)
kto        kto.KTO                     unpaired         yes
reward     reward.RewardModelObjective pairs            none
=========  ==========================  ===============  =================
"""

from __future__ import annotations

PAIRWISE = ("dpo", "simpo", "orpo", "reward")
UNPAIRED = ("kto",)
WITH_REFERENCE = ("dpo", "kto")


def needs_reference(objective: str) -> bool:
    return objective in WITH_REFERENCE


def build_objective(cfg, reference=None):
    """The objective of RunConfig `cfg`; `reference` (a `reference.Reference`) only for dpo/kto, and may be None
    when reference log-probs are precomputed into the batches."""
    p, chunk = cfg.pref, cfg.train.loss_chunk_size
    common = dict(chunk_size=chunk)
    if cfg.objective == "sft":
        from .sft import SFT

        return SFT(chunk)
    if cfg.objective == "dpo":
        from .dpo import DPO

        return DPO(p.beta, loss=p.loss, label_smoothing=p.label_smoothing, reference=reference,
                   sft_weight=p.sft_weight, **common)
    if cfg.objective == "simpo":
        from .simpo import SimPO

        return SimPO(p.beta, gamma_beta_ratio=p.gamma_beta_ratio, label_smoothing=p.label_smoothing,
                     sft_weight=p.sft_weight, **common)
    if cfg.objective == "orpo":
        from .orpo import ORPO

        return ORPO(p.beta, prompt_loss=p.orpo_prompt_loss, sft_weight=p.sft_weight, **common)
    if cfg.objective == "kto":
        from .kto import KTO

        return KTO(p.beta, p.desirable_weight, p.undesirable_weight, reference=reference, **common)
    if cfg.objective == "reward":
        from .reward import RewardModelObjective

        return RewardModelObjective(p.center_rewards)
    raise ValueError(f"unknown objective {cfg.objective!r}")

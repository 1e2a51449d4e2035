"""Training objectives: `Objective.loss(model, batch) -> (loss_sum, n, metrics)` and the run hooks each one
declares (base.py). May import: torch, transformers, tunelab.errors, tunelab.console, tunelab.data,
tunelab.adapters.base (never a specific method), tunelab.models; never train/, eval/ or lab/.

`build_objective(cfg)` maps a RunConfig's ``objective`` and ``pref`` section to an instance:

=========  ==========================  ===============  =================
objective  module                      data kind        reference model
=========  ==========================  ===============  =================
sft        sft.SFT                     sft              —
dpo        dpo.DPO (pref.loss: sigmoid/ipo/cdpo/robust/hinge)  pairs  yes
simpo      simpo.SimPO                 pairs            none (reference-free)
orpo       orpo.ORPO                   pairs            none (reference-free)
kto        kto.KTO                     unpaired         yes
grpo       grpo.GRPO (rl.*)            prompts          yes (used when rl.beta > 0)
rloo       grpo.RLOO (same loss)       prompts          yes (used when rl.beta > 0)
reward     reward.RewardModelObjective pairs            none
rejection_sampling  rejection_sampling.RejectionSampling  prompts (best of G → SFT)  —
online_dpo online_dpo.OnlineDPO        prompts (best vs worst → DPO)  yes
ppo        ppo.PPO (rl.*, ppo.*)       prompts (+ value model)        yes (used when rl.beta > 0)
=========  ==========================  ===============  =================

Measuring a model (held-out loss, perplexity, choice scores, preference metrics, reference log-probs) goes
through one batched no-grad loop, `scoring.score_batches`, run inside `scoring.eval_mode`.
"""

from __future__ import annotations

from .dpo import DPO
from .grpo import GRPO, RLOO
from .kto import KTO
from .online_dpo import OnlineDPO
from .rejection_sampling import RejectionSampling
from .orpo import ORPO
from .ppo import PPO, AdaptiveKL
from .reward import RewardModelObjective
from .sft import SFT
from .simpo import SimPO

OBJECTIVES = {c.name: c for c in (SFT, DPO, SimPO, ORPO, KTO, RewardModelObjective, RejectionSampling, OnlineDPO,
                                 GRPO, RLOO, PPO)}


def objective_class(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}")
    return OBJECTIVES[name]


def build_objective(cfg, reference=None):
    """The objective of RunConfig `cfg`; `reference` (a `reference.Reference`) only for objectives that need
    one, and may be None when reference log-probs are precomputed into the batches."""
    p, chunk = cfg.pref, cfg.train.loss_chunk_size
    if cfg.objective in ("sft", "rejection_sampling"):
        return objective_class(cfg.objective)(chunk)
    if cfg.objective in ("dpo", "online_dpo"):
        return objective_class(cfg.objective)(p.beta, loss=p.loss, label_smoothing=p.label_smoothing, reference=reference,
                   sft_weight=p.sft_weight, chunk_size=chunk)
    if cfg.objective == "simpo":
        return SimPO(p.beta, gamma_beta_ratio=p.gamma_beta_ratio, label_smoothing=p.label_smoothing,
                     sft_weight=p.sft_weight, chunk_size=chunk)
    if cfg.objective == "orpo":
        return ORPO(p.beta, prompt_loss=p.orpo_prompt_loss, sft_weight=p.sft_weight, chunk_size=chunk)
    if cfg.objective == "kto":
        return KTO(p.beta, p.desirable_weight, p.undesirable_weight, reference=reference, chunk_size=chunk)
    if cfg.objective == "reward":
        return RewardModelObjective(p.center_rewards)
    if cfg.objective in ("grpo", "rloo"):
        rl = getattr(cfg, "rl", None)
        return objective_class(cfg.objective)(
            beta=getattr(rl, "beta", 0.0), epsilon=getattr(rl, "epsilon", 0.2),
            epsilon_high=getattr(rl, "epsilon_high", None), loss_agg=getattr(rl, "loss_agg", "token_mean"),
            kl_estimator=getattr(rl, "kl_estimator", None) or "k3",
            max_completion_length=getattr(rl, "max_new_tokens", None),
            temperature=getattr(rl, "temperature", 1.0), reference=reference, chunk_size=chunk,
            share_prompts=getattr(rl, "share_prompts", True),
            importance_sampling=getattr(rl, "importance_sampling", "token"),
            mask_truncated=getattr(rl, "mask_truncated", False), entropy_coef=getattr(rl, "entropy_coef", 0.0))
    if cfg.objective == "ppo":
        rl, p = cfg.rl, cfg.ppo
        return PPO(value_coef=p.value_coef, epsilon_value=p.epsilon_value, target_kl=p.target_kl,
                   kl=AdaptiveKL(rl.beta, p.kl_target, p.kl_horizon, p.adaptive_kl), epsilon=rl.epsilon,
                   epsilon_high=rl.epsilon_high, loss_agg=rl.loss_agg, max_completion_length=rl.max_new_tokens,
                   temperature=rl.temperature, reference=reference, chunk_size=chunk,
                   entropy_coef=rl.entropy_coef, value_warmup_rounds=p.value_warmup_rounds)
    raise ValueError(f"unknown objective {cfg.objective!r}")

"""PPO for RLHF (Ouyang et al. 2022, InstructGPT, arXiv:2203.02155; Ziegler et al. 2019, arXiv:1909.08593;
Schulman et al. 2017, arXiv:1707.06347), with the practices Xu et al. 2024 ("Is DPO Superior to PPO for LLM
Alignment?", arXiv:2404.10719, §5) find decisive as switches: advantage normalisation, large rollout batches,
an exponential-moving-average reference.

PPO's row builder (`rl/rows/ppo.py`; the pure functions in `rl/ppo_round.py`) prepares each round — per completion token t
of row i, with s_i the sequence score of the reward functions (`rl.rewards`, e.g. a tunelab reward-model run or
a verifiable reward):

    KL_t   = log π_old(y_t) − log π_ref(y_t)    (k1, default)   or   exp(d) − d − 1, d = log π_ref − log π_old  (k3)
    s_i'   = s_i − p·[no end of turn]  → optionally normalised over the round (ppo.reward_norm), clipped to ±c
    r_t    = −β·KL_t  +  [t = last token]·s_i'
    V_t    = the value model (`objectives/value.py`) at the state before y_t, with the rollout's weights (V_old)
    A_t, R_t = GAE(γ, λ) of r, V (`rl.advantages.gae`);  A ← whiten(A) over the round's tokens (ppo.whiten_advantages)

and β follows the adaptive controller of Ziegler et al. (2019, §2.2) when ``ppo.adaptive_kl`` (`AdaptiveKL`).
This objective is the update on those rows, for ``rl.ppo_epochs`` passes in minibatches (the loop's micro-batches):

    ρ_t     = exp(log π_θ(y_t) − log π_old(y_t))
    pg_t    = − min(ρ_t·A_t, clip(ρ_t, 1 − ε, 1 + ε)·A_t)                       ε = ppo.epsilon (0.2)
    vf_t    = ½·max((V_φ,t − R_t)², (clip(V_φ,t, V_old,t − ε_v, V_old,t + ε_v) − R_t)²)   ε_v = ppo.epsilon_value
    ℓ_t     = pg_t + c_v·vf_t                                                    c_v = ppo.value_coef
    loss    = Σ_t ℓ_t / (number of completion tokens)   (the loop's Σ loss_sum / Σ n; ppo.loss_agg as for GRPO)

The KL penalty is in the reward, not in the loss (InstructGPT's form). Early stop: when a minibatch's
approximate KL to π_old, mean((ρ − 1) − log ρ) (Schulman's k3), exceeds ``ppo.target_kl``, that minibatch and
the rest of its round train nothing (a zero loss over zero units), as in Stable-Baselines3; an optimizer step
left with no loss unit at all is skipped by the loop (AdamW would otherwise still move the weights).

Critic warm-up (``ppo.value_warmup_rounds`` N): in rounds 0 … N−1 the policy forward runs without a graph and
ℓ_t = c_v·vf_t, so only the value model learns (the policy's parameters get no gradient; refused under torchrun,
where DDP expects every parameter to get one). Entropy bonus (``ppo.entropy_coef`` c_H): ℓ_t ← ℓ_t − c_H·H_t.

Metrics (micro-batch; token means over completion tokens): ``clip_fraction`` (policy), ``value_clip_fraction``
(share of tokens where the clipped value term is the larger), ``value_loss`` (mean vf_t), ``approx_kl``,
``ratio``, ``early_stopped``, ``entropy`` (mean H(π_θ(·|y_<t)) over completion tokens, from the full
distribution); the round's ``reward``, ``kl``, ``kl_coef``, ``entropy_sampled`` (−mean log π_old(y)),
``explained_variance``,
``completion_length``… come from the rollout round. The same recipe is implemented by TRL's `PPOTrainer` and
verl (`core_algos.compute_gae_advantage_return`, `compute_value_loss`); the tests here check hand-computed
values, not those implementations.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from pydantic import Field

from ..errors import TunelabError
from .grpo import GRPO, ClipOptions, KLEstimator
from .value import add_value_model, detached, token_values


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       epsilon_value: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(vf [B, T], clipped [B, T] bool): ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²) per token; no clipping
    for ε_v = None. `clipped` marks tokens where the clipped term is the larger (its gradient is cut)."""
    unclipped = (values - returns) ** 2
    if epsilon_value is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    v_clip = old_values + torch.clamp(values - old_values, -epsilon_value, epsilon_value)
    clipped_sq = (v_clip - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped_sq), clipped_sq > unclipped


class AdaptiveKL:
    """Ziegler et al. 2019 (arXiv:1909.08593, §2.2): after a rollout of n sequences with mean KL(π‖π_ref) per
    sequence KL (the sum over its tokens),

        e = clip(KL / KL_target − 1, −0.2, 0.2),    β ← β·(1 + e·n / horizon)

    (TRL's `AdaptiveKLController`). ``adaptive=False`` keeps β fixed."""

    def __init__(self, beta: float, target: float = 6.0, horizon: int = 10000, adaptive: bool = False):
        self.value, self.target, self.horizon, self.adaptive = float(beta), target, horizon, adaptive

    def update(self, kl: float, n: int) -> float:
        if self.adaptive:
            e = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + e * n / self.horizon
        return self.value


class PPOOptions(ClipOptions):
    """The ``ppo:`` section: the clipped update's options (β is the per-token KL penalty *in the reward*, k1 by
    default) plus the value model, GAE and the round's reward shaping. The passes over a round are
    ``rl.ppo_epochs``; a round is ``rl.prompts_per_step × rl.group_size`` completions."""

    kl_estimator: KLEstimator = "k1"  # of the KL in the reward (InstructGPT's log-ratio)
    value_model: Literal["auto", "adapter", "copy"] = "auto"  # auto: adapter (adapter methods) / copy (full)
    value_init: str | None = None  # an `objective: reward` run: V starts as it (head + body)
    value_coef: float = Field(0.1, ge=0.0)  # c_v
    epsilon_value: float | None = Field(0.2, gt=0.0)  # value clip ε_v (None: unclipped value loss)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    whiten_advantages: bool = True  # normalise A over each round's completion tokens (Xu et al. 2024)
    reward_norm: bool = False  # normalise the round's sequence scores to mean 0, std 1
    reward_clip: float | None = Field(None, gt=0.0)  # then clip them to ±reward_clip
    missing_eot_penalty: float = Field(0.0, ge=0.0, description=(
        "p in s' = s − p for every completion that ran out of rl.max_new_tokens (no end of turn); default 0 (TRL's "
        "default): no penalty — a cut completion keeps the score the reward functions give it (a reward model "
        "scores its ids as sampled, the turn left open). A run with a reward model and cut completions at p = 0 "
        "gets a one-line hint."))
    adaptive_kl: bool = False  # Ziegler et al. 2019: β moves to keep the per-sequence KL near kl_target
    kl_target: float = Field(6.0, gt=0.0)
    kl_horizon: int = Field(10000, ge=1)
    target_kl: float | None = Field(None, gt=0.0)  # early stop a round when a minibatch's approx-KL exceeds it
    value_warmup_rounds: int = Field(0, ge=0)  # critic warm-up: the first N rounds train the value model only


class PPO(GRPO):
    """PPO with a value model and per-token GAE advantages (see the module docstring): GRPO's clipped surrogate
    on per-token advantages, extended through GRPO's named points — `before_round` (the adaptive KL controller,
    which PPO owns), `trains_policy` (the critic warm-up), `skipped` (the approx-KL early stop), `extra_loss` (the
    clipped value loss). The reference is built when ``ppo.beta`` > 0, as for GRPO (inherited `wants_reference`)."""

    name = "ppo"
    row_builder = "ppo"  # rl/rows/ppo.py: per-token rewards, values, GAE
    advantage_estimator = None  # per-token GAE, computed by the row builder
    Options = PPOOptions

    @classmethod
    def from_config(cls, cfg, reference=None):
        o, rl = cls.options(cfg), cfg.rl
        return cls(value_coef=o.value_coef, epsilon_value=o.epsilon_value, target_kl=o.target_kl,
                   kl=AdaptiveKL(o.beta, o.kl_target, o.kl_horizon, o.adaptive_kl), epsilon=o.epsilon,
                   epsilon_high=o.epsilon_high, loss_agg=o.loss_agg, kl_estimator=o.kl_estimator,
                   max_completion_length=rl.max_new_tokens, temperature=rl.temperature, reference=reference,
                   chunk_size=cfg.train.loss_chunk_size, entropy_coef=o.entropy_coef,
                   recompute_old_logprobs=o.recompute_old_logprobs, value_warmup_rounds=o.value_warmup_rounds)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        o = cls.options(cfg)
        if o.adaptive_kl and o.beta <= 0:
            raise TunelabError("ppo.adaptive_kl needs ppo.beta > 0 (the controller's starting β)")
        if o.value_warmup_rounds and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TunelabError("ppo.value_warmup_rounds is not supported under torchrun (DDP expects every "
                               "trainable parameter to get a gradient at every step)")
        units = cfg.rl.prompts_per_step * cfg.rl.group_size
        if o.whiten_advantages and units < 2:
            raise TunelabError("ppo.whiten_advantages needs at least 2 completions per round "
                               "(rl.prompts_per_step × rl.group_size)")

    @classmethod
    def prepare_model(cls, model, cfg=None) -> None:
        o = cls.options(cfg)
        add_value_model(model, o.value_model, o.value_init)

    def saving(self, model, out):
        return detached(model, out)

    def __init__(self, *, value_coef: float = 0.1, epsilon_value: float | None = 0.2,
                 target_kl: float | None = None, kl: AdaptiveKL | None = None, value_warmup_rounds: int = 0,
                 **grpo_options):
        super().__init__(**{**grpo_options, "beta": 0.0})  # no KL term in the loss: it is in the reward
        self.value_coef, self.epsilon_value, self.target_kl = value_coef, epsilon_value, target_kl
        self.value_warmup_rounds = value_warmup_rounds  # rounds 0..N−1 train V only (critic warm-up)
        self.kl = kl or AdaptiveKL(0.0)
        self.kl_round = -1  # the last rollout round the KL controller has seen
        self.stopped_round = -1  # the rollout round whose remaining minibatches are skipped (approx-KL stop)

    @staticmethod
    def _round(batch: dict) -> int | None:
        return int(batch["round"][0]) if batch.get("round") is not None else None

    def before_round(self, batch: dict) -> None:
        """At a round's first micro-batch, the controller sees that round's KL (β for the next round). The rows
        carry the round's mean per-sequence KL and sequence count over every rank, so β is the same on all."""
        round_ = self._round(batch)
        if round_ is None or round_ == self.kl_round or batch.get("round_kl") is None:
            return
        self.kl.update(float(batch["round_kl"][0]), int(round(float(batch["round_sequences"][0]))))
        self.kl_round = round_

    def trains_policy(self, batch: dict) -> bool:
        """Critic warm-up (ReaLHF / OpenRLHF's freezing_actor_steps): in rounds 0 … N−1 only the value model
        learns; the policy forward runs without a graph, so the optimizer leaves the policy exactly as it is."""
        round_ = self._round(batch)
        return not (round_ is not None and round_ < self.value_warmup_rounds)

    def skipped(self, batch: dict, mask, logp, old) -> dict | None:
        """Early stop: a minibatch whose approx KL to π_old, mean((ρ − 1) − log ρ), exceeds ``target_kl`` and the
        rest of its round train nothing."""
        round_ = self._round(batch)
        if round_ is not None and round_ == self.stopped_round:
            return {"early_stopped": 1.0}
        m = mask.float()
        log_ratio = (logp.detach() - old) * m
        self._approx_kl = float(((torch.exp(log_ratio) - 1 - log_ratio) * m).sum() / m.sum().clamp(min=1))
        if self.target_kl is not None and self._approx_kl > self.target_kl and round_ is not None:
            self.stopped_round = round_
            return {"early_stopped": 1.0, "approx_kl": self._approx_kl}
        return None

    def extra_loss(self, model, batch: dict, mask, logp, ref, pg) -> tuple[torch.Tensor, dict]:
        """c_v · vf_t, the clipped value loss, and its metrics."""
        values = token_values(model, batch)
        vf, v_clipped = clipped_value_loss(values, batch["old_values"].float(), batch["returns"].float(),
                                           self.epsilon_value)
        m = mask.float()
        tokens = m.sum().clamp(min=1)

        def mean(x):
            return float((x.detach().float() * m).sum() / tokens)

        return self.value_coef * vf, {"value_clip_fraction": mean(v_clipped), "value_loss": mean(vf),
                                      "policy_loss": mean(pg), "approx_kl": self._approx_kl, "early_stopped": 0.0,
                                      "value_mean": mean(values), "value_warmup": float(not self.trains_policy(batch))}

    # ------------------------------------------------------------------------------------- state (resume)
    def state_dict(self) -> dict[str, torch.Tensor]:
        own = {"ppo.kl_coef": torch.tensor(self.kl.value, dtype=torch.float64),
               "ppo.kl_round": torch.tensor(self.kl_round, dtype=torch.long),
               "ppo.stopped_round": torch.tensor(self.stopped_round, dtype=torch.long)}
        return {**own, **{f"ref.{k}": v for k, v in super().state_dict().items()}}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.kl.value = float(sd["ppo.kl_coef"]) if "ppo.kl_coef" in sd else self.kl.value
        self.kl_round = int(sd["ppo.kl_round"]) if "ppo.kl_round" in sd else -1
        self.stopped_round = int(sd["ppo.stopped_round"]) if "ppo.stopped_round" in sd else -1
        super().load_state_dict({k[len("ref."):]: v for k, v in sd.items() if k.startswith("ref.")})

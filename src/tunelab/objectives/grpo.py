"""The clipped policy-gradient objective of GRPO and RLOO (one loss; the estimator differs, not the loss).

Online RL trains on completions the policy itself sampled. The rollout source (rl/rollout.py) samples G
completions per prompt, scores them (rl/rewards.py) and turns the rewards into one advantage per completion
(rl/advantages.py: ``grpo`` group-normalised, ``dr_grpo``, ``rloo`` leave-one-out — picked from the objective's
`advantage_estimator` unless the section's ``advantage`` says otherwise). This objective only sees the result:

Batch (B rows = completions, T = prompt + completion length; one sequence per row, never packed):
    input_ids       [B, T] long  — prompt followed by its completion; the prompt may be left-padded, the
                                   completion right-padded: nothing here assumes either
    attention_mask  [B, T] long  — 1 on real tokens
    position_ids    [B, T] long  — optional; default attention_mask.cumsum(-1) − 1 (the sampler's positions,
                                   so left padding does not shift them)
    loss_mask       [B, T] bool  — True at completion tokens: token t is a target predicted from position t−1
                                   (tunelab's convention, `logprobs.token_logprobs`)
    advantages      [B]    fp32  — one advantage per completion, from an estimator
    prompt_index    [B]    long  — optional; which prompt each row completes. Rows of one prompt are then scored
                                   with the prompt encoded once (`prompt_sharing`, exact; ``share_prompts``)
    old_logprobs    [B, T] fp32  — optional; log π_old(y_t) of the policy that sampled the rows (the sampler's
                                   log-probs, at the sampling temperature), aligned like loss_mask, 0 off it.
                                   Absent: logp.detach() — the ratio is exactly 1 (TRL's shortcut when each
                                   rollout is used for one optimizer step)
    ref_logprobs    [B, T] fp32  — optional; log π_ref(y_t), aligned the same way. Absent and β > 0: computed
                                   here by the run's `Reference` (before the policy forward, as DPO does)

Per completion token t of row i (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, eq. 3; PPO's clipped
surrogate, Schulman et al. 2017; asymmetric clip ε_high from DAPO, Yu et al. 2025, arXiv:2503.14476):

    ρ_t   = exp(log π_θ(y_t) − log π_old(y_t))
    pg_t  = − min(ρ_t · A_i,  clip(ρ_t, 1 − ε_low, 1 + ε_high) · A_i)
    ℓ_t   = pg_t + β · KL_t,    KL_t = exp(d) − d − 1,  d = log π_ref(y_t) − log π_θ(y_t)   (``k3``)
                               KL_t = −d = log π_θ(y_t) − log π_ref(y_t)                    (``k1``)

k3 is Schulman's unbiased, non-negative approximator of KL(π_θ ‖ π_ref) ("Approximating KL Divergence",
2020) that GRPO adds to the loss (eq. 4); k1 is the plain log-ratio. β = 0 skips the reference altogether.
Log-probs are those of softmax(logits / temperature) at the sampling temperature (as TRL and verl score them),
so that π_θ = π_old exactly before the first update.

Options (the formulas in `objectives/policy_loss.py`): ``importance_sampling`` — ``token`` (above), ``sequence``
(GSPO: one ratio s_i per completion, clipped as a whole) or ``sequence_token`` (GSPO-token); ``mask_truncated`` —
DAPO's overlong filtering, rows with ``truncated`` [B] true leave the loss and its normaliser; ``entropy_coef`` c_H
— ℓ_t ← ℓ_t − c_H·H_t, the entropy with its gradient.

Aggregation ``loss_agg`` → (loss_sum, n); the loop divides Σ loss_sum by Σ n over all micro-batches and ranks:

``token_mean``     DAPO (TRL 1.16's default ``loss_type="dapo"``): every completion token of the optimizer
                   batch weighs the same.  loss_sum = Σ_i Σ_t ℓ_t,  n = number of completion tokens.
``sequence_mean``  original GRPO (TRL ``"grpo"``): mean over each completion's tokens, then over completions.
                   loss_sum = Σ_i (1/|y_i|) Σ_t ℓ_t,  n = B.  Favours short correct and long wrong answers.
``constant``       Dr. GRPO (Liu et al. 2025, arXiv:2503.20783; TRL ``"dr_grpo"``): a fixed normaliser.
                   loss_sum = Σ_i Σ_t ℓ_t / L,  n = B,  L = max_completion_length (``rl.max_new_tokens``).

Options: the ``grpo:`` / ``rloo:`` section (`GRPOOptions`; β, ε, ε_high, loss_agg, the KL estimator, the
advantage estimator, share_prompts); the sampling settings (temperature, max_new_tokens) are the shared ``rl:``.

Metrics (micro-batch; token means over completion tokens): ``kl`` (mean KL_t, when β > 0), ``clip_fraction``
(share of tokens whose clip is active, i.e. the gradient is cut: ρ < 1−ε_low with A < 0 or ρ > 1+ε_high with
A > 0 — TRL's clip_ratio/region_mean), ``ratio`` (mean ρ), ``adv_mean``/``adv_std`` over rows,
``completion_len`` (mean completion tokens), ``entropy`` (mean over completion tokens of the policy's
H(π_θ(·|y_<t)) at the sampling temperature — a collapse of exploration shows here first; computed inside the
chunked head from the logits it builds anyway, no gradient).
Reference implementation: TRL 1.16 `GRPOTrainer._compute_loss`, which the tests run on identical inputs.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Literal

import torch
from pydantic import Field

from ..config import Strict
from ..errors import TunelabError
from .base import RunHooks
from .logprobs import target_mask
from .policy_loss import clipped_pg, entropy_bonus, gspo_pg, overlong_mask
from .prompt_sharing import group_token_logprobs
from .reference import ReferenceHooks

LossAgg = Literal["token_mean", "sequence_mean", "constant"]
KLEstimator = Literal["k1", "k3"]
LOSS_AGGS = LossAgg.__args__
KL_ESTIMATORS = KLEstimator.__args__
ImportanceSampling = Literal["token", "sequence", "sequence_token"]  # PPO/GRPO, GSPO, GSPO-token
IMPORTANCE_SAMPLING = ImportanceSampling.__args__


class ClipOptions(Strict):
    """The clipped policy-gradient update every policy-gradient objective shares (grpo, rloo, ppo extend it)."""

    moved_from: ClassVar[dict[str, str]] = {"rl.beta": "beta", "rl.kl_estimator": "kl_estimator",
                                            "rl.epsilon": "epsilon", "rl.epsilon_high": "epsilon_high",
                                            "rl.loss_agg": "loss_agg"}

    beta: float = Field(0.0, ge=0.0)  # KL(π‖π_ref) coefficient (0: no reference forward at all)
    kl_estimator: KLEstimator = "k3"
    epsilon: float = Field(0.2, gt=0.0, lt=1.0)  # clip range (low): ratios below 1 − ε are clipped
    epsilon_high: float | None = Field(None, gt=0.0)  # clip range (high); None = epsilon (DAPO: 0.28)
    loss_agg: LossAgg = "token_mean"
    entropy_coef: float = Field(0.0, ge=0.0)  # ℓ_t − c_H·H_t (entropy bonus; 0 = off; objectives/policy_loss.py)
    # π_old = the trainer's own no-grad forward at the round's start (TRL/verl), not the sampler's (rl/old_policy.py)
    recompute_old_logprobs: bool = False


class GRPOOptions(ClipOptions):
    """The ``grpo:`` section (``rloo:`` has the same options)."""

    moved_from: ClassVar[dict[str, str]] = {"rl.advantage": "advantage", "rl.share_prompts": "share_prompts"}

    # rl/advantages.py ESTIMATORS name; None: the objective's own (grpo: grpo, rloo: rloo); reinforce_pp(_baseline):
    # REINFORCE++ (global-batch normalisation, no critic)
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] | None = None
    # score a prompt's completions with the prompt encoded once (exact; objectives/prompt_sharing.py)
    share_prompts: bool = True
    # "token" (PPO/GRPO ratio per token), "sequence" (GSPO), "sequence_token" (GSPO-token); objectives/policy_loss.py
    importance_sampling: ImportanceSampling = "token"
    mask_truncated: bool = False  # DAPO overlong filtering: completions cut at max_new_tokens train nothing
    dynamic_sampling: bool = False  # DAPO: drop all-equal-reward groups, sample more to fill the round
    dynamic_sampling_max_rounds: int = Field(3, ge=1)  # extra sampling passes at most per round (then fill)


def targets(batch: dict) -> torch.Tensor:
    """The completion tokens scored: `loss_mask` without position 0 (never predicted), [B, T] bool."""
    return target_mask(batch["loss_mask"])


def with_positions(batch: dict) -> dict:
    """The batch with `position_ids` = running count of real tokens − 1 when it has none (left padding safe)."""
    if batch.get("position_ids") is not None:
        return batch
    am = batch["attention_mask"].long()
    return {**batch, "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}


def token_kl(logp: torch.Tensor, ref: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from log π_θ and log π_ref of the sampled tokens."""
    d = ref - logp
    if estimator == "k3":
        return torch.exp(d) - d - 1
    if estimator == "k1":
        return -d
    raise TunelabError(f"unknown KL estimator {estimator!r}; choose {', '.join(KL_ESTIMATORS)}")


def skip_loss(model, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss of 0 over 0 units that still backpropagates (the loop calls backward on every micro-batch)."""
    p = next(p for p in model.parameters() if p.requires_grad)
    return (p.sum() * 0.0).float(), torch.zeros((), dtype=torch.long, device=mask.device)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token_mean",
              max_completion_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n) of per-token losses [B, T] over `mask` for the loop's Σ loss_sum / Σ n (see module doc)."""
    m = mask.to(per_token.dtype)
    per_row = (per_token * m).sum(-1)
    B = torch.tensor(per_token.shape[0], device=per_token.device)
    if loss_agg == "token_mean":
        return per_row.sum(), mask.sum()
    if loss_agg == "sequence_mean":
        return (per_row / m.sum(-1).clamp(min=1)).sum(), B
    if loss_agg == "constant":
        if not max_completion_length:
            raise TunelabError("loss_agg=constant (Dr. GRPO) needs max_completion_length (rl.max_new_tokens)")
        return per_row.sum() / max_completion_length, B
    raise TunelabError(f"unknown loss_agg {loss_agg!r}; choose {', '.join(LOSS_AGGS)}")


class GRPO(ReferenceHooks, RunHooks):
    """GRPO's clipped policy-gradient loss (see the module docstring); `RLOO` is the same loss."""

    name = "grpo"
    data_kind = "prompts"
    # The run builds a Reference from this class attribute; with beta == 0 the loss never calls it.
    needs_reference = True
    generator = True
    advantage_estimator = "grpo"  # rl/advantages.py ESTIMATORS name the row builder uses by default
    row_builder = "policy_gradient"  # rl/rows/policy_gradient.py: advantages, the sampler's log-probs as π_old
    Options = GRPOOptions

    @classmethod
    def wants_reference(cls, cfg) -> bool:
        return cls.options(cfg).beta > 0  # no KL term: no reference model at all (a full copy costs memory)

    @classmethod
    def from_config(cls, cfg, reference=None):
        o, rl = cls.options(cfg), cfg.rl
        return cls(beta=o.beta, epsilon=o.epsilon, epsilon_high=o.epsilon_high, loss_agg=o.loss_agg,
                   kl_estimator=o.kl_estimator, max_completion_length=rl.max_new_tokens, temperature=rl.temperature,
                   reference=reference, chunk_size=cfg.train.loss_chunk_size, share_prompts=o.share_prompts,
                   advantage=o.advantage, importance_sampling=o.importance_sampling,
                   mask_truncated=o.mask_truncated, entropy_coef=o.entropy_coef,
                   recompute_old_logprobs=o.recompute_old_logprobs, dynamic_sampling=o.dynamic_sampling,
                   dynamic_sampling_max_rounds=o.dynamic_sampling_max_rounds)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if getattr(cfg.reference, "precompute", False):
            raise TunelabError(f"reference.precompute does not apply to {cls.name}: its completions are sampled "
                               "during training (the rollout source can pass ref_logprobs instead)")

    def __init__(self, beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
                 loss_agg: str = "token_mean", kl_estimator: str = "k3", max_completion_length: int | None = None,
                 temperature: float = 1.0, reference=None, chunk_size: int = 1024, share_prompts: bool = True,
                 advantage: str | None = None, importance_sampling: str = "token", mask_truncated: bool = False,
                 entropy_coef: float = 0.0, recompute_old_logprobs: bool = False, dynamic_sampling: bool = False,
                 dynamic_sampling_max_rounds: int = 3):
        if importance_sampling not in IMPORTANCE_SAMPLING:
            raise TunelabError(f"unknown importance_sampling {importance_sampling!r}; "
                               f"choose {', '.join(IMPORTANCE_SAMPLING)}")
        if loss_agg not in LOSS_AGGS:
            raise TunelabError(f"unknown loss_agg {loss_agg!r}; choose {', '.join(LOSS_AGGS)}")
        if kl_estimator not in KL_ESTIMATORS:
            raise TunelabError(f"unknown KL estimator {kl_estimator!r}; choose {', '.join(KL_ESTIMATORS)}")
        if loss_agg == "constant" and not max_completion_length:
            raise TunelabError("loss_agg=constant (Dr. GRPO) needs max_completion_length (rl.max_new_tokens)")
        self.beta, self.epsilon = beta, epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.loss_agg, self.kl_estimator = loss_agg, kl_estimator
        self.max_completion_length = max_completion_length
        self.temperature = temperature if temperature and temperature > 0 else 1.0  # greedy: plain log-probs
        self.reference, self.chunk_size = reference, chunk_size
        self.share_prompts = share_prompts  # one prompt encoding per group (prompt_sharing.py)
        # the estimator the rollout source applies: the options' `advantage`, else the objective's own
        self.advantage_estimator = advantage or type(self).advantage_estimator
        # objectives/policy_loss.py: GSPO, DAPO overlong filtering, entropy bonus
        self.importance_sampling, self.mask_truncated, self.entropy_coef = \
            importance_sampling, mask_truncated, entropy_coef
        # read by the rollout source: π_old recompute (rl/old_policy.py), DAPO dynamic sampling
        self.recompute_old_logprobs = recompute_old_logprobs
        self.dynamic_sampling, self.dynamic_sampling_max_rounds = dynamic_sampling, dynamic_sampling_max_rounds

    def reference_logprobs(self, batch: dict) -> torch.Tensor:
        if batch.get("ref_logprobs") is not None:
            return batch["ref_logprobs"].float()
        if self.reference is None:
            raise TunelabError(f"{self.name}: beta > 0 needs a reference model or precomputed ref_logprobs")
        return self.reference.token_logprobs(batch, temperature=self.temperature, share_prompts=self.share_prompts)

    def loss(self, model, batch: dict):
        """The clipped surrogate of the module docstring. A subclass extends it through named points rather than
        replacing it: `before_round` (state updated from what a round's rows carry), `trains_policy` (whether the
        policy term trains this micro-batch: PPO's critic warm-up), `skipped` (a micro-batch that trains nothing)
        and `extra_loss` (per-token terms added to the policy loss: GRPO's β·KL; PPO's value loss)."""
        batch = with_positions(batch)
        mask = targets(batch)
        if self.mask_truncated:  # DAPO overlong filtering: truncated completions train nothing
            mask = overlong_mask(mask, batch.get("truncated"))
        self.before_round(batch)
        policy = self.trains_policy(batch)
        ref = self.reference_logprobs(batch).masked_fill(~mask, 0.0) if self.beta else None  # before the policy
        # without a graph when the policy term does not train: its parameters get no gradient at all
        with contextlib.nullcontext() if policy else torch.no_grad():
            logp, entropy = group_token_logprobs(model, batch, self.chunk_size, temperature=self.temperature,
                                                 return_entropy="grad" if self.entropy_coef and policy else True,
                                                 share=self.share_prompts)
        old = batch.get("old_logprobs")
        old = logp.detach() if old is None else old.float().masked_fill(~mask, 0.0)
        skip = self.skipped(batch, mask, logp, old)
        if skip is not None:
            return (*skip_loss(model, mask), skip)
        adv = batch["advantages"].float().to(logp.device)
        if adv.dim() == 2:  # per-token advantages (PPO's GAE): nothing off the completion tokens
            adv = adv.masked_fill(~mask, 0.0)
        pg, ratio, clipped = self.policy_term(logp, old, adv, mask)
        per_token = pg if policy else torch.zeros_like(pg)
        if self.entropy_coef and policy:
            per_token = per_token + entropy_bonus(entropy, self.entropy_coef)
        extra, extra_metrics = self.extra_loss(model, batch, mask, logp, ref, pg)
        if extra is not None:
            per_token = per_token + extra
        loss_sum, n = aggregate(per_token, mask, self.loss_agg, self.max_completion_length)
        return loss_sum, n, {**self.metrics(mask, ratio, clipped, adv, None, entropy), **extra_metrics}

    # ------------------------------------------------------------------ extension points (see `loss`)
    def before_round(self, batch: dict) -> None:
        """Called first with every micro-batch (GRPO keeps no state of its own)."""

    def trains_policy(self, batch: dict) -> bool:
        """Whether the policy term (surrogate + entropy bonus) trains on this micro-batch."""
        return True

    def skipped(self, batch: dict, mask, logp, old) -> dict | None:
        """Metrics of a micro-batch that trains nothing (a loss of 0 over 0 units), or None to train on it."""
        return None

    def extra_loss(self, model, batch: dict, mask, logp, ref, pg) -> tuple[torch.Tensor | None, dict]:
        """(per-token term [B, T] added to the policy loss, or None; its metrics): GRPO's β·KL_t to π_ref."""
        if not self.beta:
            return None, {}
        kl = token_kl(logp, ref, self.kl_estimator)
        m = mask.float()
        return self.beta * kl, {"kl": float((kl.detach() * m).sum() / m.sum().clamp(min=1))}

    def policy_term(self, logp, old, adv, mask):
        """(pg, ratio, clipped) [B, T]: the token-level clipped surrogate, or GSPO's sequence-level one."""
        if self.importance_sampling == "token":
            return clipped_pg(logp, old, adv, self.epsilon, self.epsilon_high)
        return gspo_pg(logp, old, adv, mask, self.epsilon, self.epsilon_high,
                       per_token=self.importance_sampling == "sequence_token")

    @staticmethod
    def metrics(mask, ratio, clipped, adv, kl=None, entropy=None) -> dict[str, float]:
        m = mask.float()
        tokens = m.sum().clamp(min=1)

        def mean(x):
            return float((x.detach().float() * m).sum() / tokens)

        a = adv[mask] if adv.dim() == 2 else adv  # per-token advantages: over the completion tokens
        out = {"clip_fraction": mean(clipped), "ratio": mean(ratio), "adv_mean": float(a.mean()) if a.numel() else 0.0,
               "adv_std": float(a.std()) if a.numel() > 1 else 0.0,
               "completion_len": float(m.sum(-1).mean())}
        if kl is not None:
            out["kl"] = mean(kl)
        if entropy is not None:
            out["entropy"] = mean(entropy)
        return out

    # ---------------------------------------------------------------------------------------- run measures
    # An online run's measure is the mean greedy reward on held-out prompts, which needs the sampler and the
    # reward functions: the rollout source supplies it (`RolloutSource.measure` …, preferred by train/run.py).
    # These are what the objective alone can measure — nothing — for callers that build it without a source.
    def measure(self, model, train: list, evals: list, pad_id: int, cfg) -> dict:
        return {}

    def measure_during(self, model, evals: list, pad_id: int, cfg) -> dict:
        return {}

    def result_fields(self, before: dict, after: dict) -> dict:
        return {}

    def describe(self, m: dict) -> str:
        return ""


class RLOO(GRPO):
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740): the same clipped loss on leave-one-out advantages."""

    name = "rloo"
    advantage_estimator = "rloo"

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.rl.group_size < 2 and (cls.options(cfg).advantage or cls.advantage_estimator) == "rloo":
            raise TunelabError(f"rl.group_size={cfg.rl.group_size}: rloo's leave-one-out baseline needs at least "
                               "2 completions per prompt")

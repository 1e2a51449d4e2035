"""Shared machinery of the pairwise preference objectives (DPO family, SimPO, ORPO).

Notation: L_θ(y) = Σ_t log π_θ(y_t | x, y_<t) over the response tokens of y; |y| their number;
Δ(y) = L_θ(y) − L_ref(y); h = Δ(y⁺) − Δ(y⁻) for a pair (chosen y⁺, rejected y⁻).

One forward per micro-batch: `data.preference.collate_pairs` stacks the P pairs as rows
[y⁺_1 … y⁺_P, y⁻_1 … y⁻_P], so chosen and rejected share one padded batch (one pass of the decoder instead of
two, as in TRL's `concatenated_forward`). Per-sequence sums come from `logprobs.token_logprobs` (chunked lm_head,
never [B, T, V]). Reference log-probs are read from the batch (``ref_logps``, precomputed) or computed by the
`Reference` — before the policy forward, which a moving adapter reference relies on.

`loss` returns (Σ_pairs loss_i, P, metrics): the loop divides by ΣP over accumulated micro-batches, so gradient
accumulation equals one batch of all the pairs.

Optional SFT term on the chosen response, mixed into any pairwise loss (RPO: Pang et al. 2024, "Iterative
Reasoning Preference Optimization", arXiv:2404.19733; TRL's ``rpo_alpha``):

    loss_i += w · (−L_θ(y⁺_i) / |y⁺_i|)

the token-mean NLL of each chosen response (TRL averages over all chosen tokens of the batch instead; per pair
keeps the sum-over-pairs contract exact under accumulation).

Metrics (means over the micro-batch; the loop averages them over accumulation steps):
``reward_chosen``/``reward_rejected`` the objective's implicit reward (β·Δ for DPO, β·L/|y| for SimPO …),
``reward_margin``, ``pref_accuracy`` (share of pairs with reward⁺ > reward⁻), ``logp_chosen``/``logp_rejected``
(L_θ), and with a reference ``kl_ref`` = mean Δ(y) over both responses: the sample estimate of
KL(π_θ ‖ π_ref) = E_y~π_θ[Δ(y)] — exact in expectation only for on-policy y (the same estimate as KTO's z0).
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from pydantic import Field

from ..config import Strict
from ..errors import TunelabError
from .base import RunHooks
from .logprobs import sequence_logprobs, token_logprobs
from .reference import ReferenceHooks
from .scoring import score_batches


def _probe_batch(cfg) -> int:
    return max(cfg.train.batch_size, 4)


class PairMetrics:
    """Run measures of preference objectives (dpo, simpo, orpo, kto, reward): the objective's own metrics
    (`evaluate_pairs`) on the held-out pairs (``eval``) and on the first ``pref.probe`` training pairs
    (``train``) — informative before training too; results.json gets ``before`` / ``after``."""

    SUMMARY_KEYS = ("reward_margin", "pref_accuracy", "logp_margin", "logp_accuracy")

    def measure(self, model, train: list, evals: list, pad_id: int, cfg) -> dict:
        bs = _probe_batch(cfg)
        return {"train": evaluate_pairs(model, self, train[:cfg.pref.probe], pad_id, bs),
                "eval": evaluate_pairs(model, self, evals, pad_id, bs)}

    def measure_during(self, model, evals: list, pad_id: int, cfg) -> dict:
        if not evals:
            return {}
        return {f"eval_{k}": v for k, v in evaluate_pairs(model, self, evals, pad_id, _probe_batch(cfg)).items()}

    def result_fields(self, before: dict, after: dict) -> dict:
        return {"before": before, "after": after}

    def describe(self, m: dict) -> str:
        return ", ".join(f"{k} {m['train'][k]:.3f}" for k in self.SUMMARY_KEYS if k in m["train"])


class PairwiseOptions(Strict):
    """What every pairwise loss (dpo, simpo, orpo) takes: the RPO-style NLL weight on the chosen response."""

    moved_from: ClassVar[dict[str, str]] = {"pref.sft_weight": "sft_weight"}  # the keys' old places

    sft_weight: float = Field(0.0, ge=0.0)  # w of the NLL term on y⁺ (module docstring); 0 = none


class PairwiseObjective(PairMetrics, ReferenceHooks, RunHooks):
    data_kind = "pairs"
    name = "pairwise"
    needs_reference = True
    default_beta = 0.1

    def __init__(self, beta: float | None = None, reference=None, sft_weight: float = 0.0,
                 chunk_size: int = 1024):
        self.beta = self.default_beta if beta is None else beta
        self.reference = reference if self.needs_reference else None
        self.sft_weight = sft_weight
        self.chunk_size = chunk_size

    # Subclasses implement the per-pair formula.
    def pair_losses(self, lc, lr, nc, nr, rc, rr, batch):
        """Per-pair losses [P] and the implicit rewards of chosen and rejected ([P] each)."""
        raise NotImplementedError

    def reference_logps(self, batch: dict) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].float()
        if self.reference is None:
            raise TunelabError(f"{self.name}: no reference model and no precomputed reference log-probs")
        return self.reference.logps(batch)

    def policy_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tok = token_logprobs(model, batch, self.chunk_size)
        logps, lens = sequence_logprobs(tok, batch)
        return logps, lens.to(logps.dtype).clamp(min=1)

    def loss(self, model, batch: dict):
        P = batch["input_ids"].shape[0] // 2
        ref = self.reference_logps(batch) if self.needs_reference else None  # before the policy forward
        logps, lens = self.policy_logps(model, batch)
        lc, lr, nc, nr = logps[:P], logps[P:], lens[:P], lens[P:]
        rc, rr = (ref[:P], ref[P:]) if ref is not None else (None, None)
        losses, wc, wr, extra = self.pair_losses(lc, lr, nc, nr, rc, rr, batch)
        if self.sft_weight:
            nll = -lc / nc
            losses = losses + self.sft_weight * nll
            extra["nll"] = float(nll.detach().mean())
        metrics = pair_metrics(lc, lr, wc, wr, rc, rr)
        metrics.update(extra)
        self.last = (lc.detach(), lr.detach(), nc, nr)  # for evaluate_pairs' per-pair preference metrics
        return losses.sum(), torch.tensor(P, device=losses.device), metrics


def pair_metrics(lc, lr, wc, wr, rc=None, rr=None) -> dict[str, float]:
    wc, wr = wc.detach().float(), wr.detach().float()
    m = {"reward_chosen": float(wc.mean()), "reward_rejected": float(wr.mean()),
         "reward_margin": float((wc - wr).mean()), "pref_accuracy": float((wc > wr).float().mean()),
         "logp_chosen": float(lc.detach().mean()), "logp_rejected": float(lr.detach().mean())}
    if rc is not None:
        m["kl_ref"] = float(torch.cat([lc.detach() - rc, lr.detach() - rr]).mean())
    return m


def evaluate_pairs(model, objective, examples: list, pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Objective metrics averaged over `examples` (pairs or unpaired), weighted by pairs, plus the policy's own
    preference: ``logp_margin`` = mean L(y⁺) − L(y⁻), ``logp_accuracy`` = share with L(y⁺) > L(y⁻), and the
    same per token (``avg_logp_margin``/``avg_logp_accuracy``) — meaningful before training too, when every
    reference-relative reward is still 0."""
    from ..data.preference import collate_pairs, collate_unpaired

    if not examples:
        return {}
    paired = hasattr(examples[0], "chosen")
    core = objective

    def metrics(model, batch: dict) -> tuple[dict[str, float], int]:
        """The batch's metrics and its number of examples (pairs: half the rows)."""
        core.last = None
        ls, n, m = objective.loss(model, batch)
        m["loss"] = float(ls) / max(int(n), 1)
        if paired and getattr(core, "last", None) is not None:
            lc, lr, nc, nr = core.last
            d, da = lc - lr, lc / nc - lr / nr
            m.update(logp_margin=float(d.mean()), logp_accuracy=float((d > 0).float().mean()),
                     avg_logp_margin=float(da.mean()), avg_logp_accuracy=float((da > 0).float().mean()))
        rows = batch["input_ids"].shape[0]
        return m, rows // 2 if paired else rows

    collate_fn = partial(collate_pairs if paired else collate_unpaired, pad_id=pad_id)
    sums: dict[str, float] = {}
    total = 0
    for m, size in score_batches(model, examples, collate_fn, metrics, batch_size=batch_size):
        for key, v in m.items():
            sums[key] = sums.get(key, 0.0) + v * size
        total += size
    return {k: v / total for k, v in sums.items()}

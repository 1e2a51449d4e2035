"""ORPO: monolithic preference optimization without a reference model (Hong et al. 2024, arXiv:2403.07691).

With the per-token average likelihood P̄(y) = exp(L_θ(y)/|y|) and odds(y) = P̄(y) / (1 − P̄(y)):

    log OR = log odds(y⁺) − log odds(y⁻)
           = (ā⁺ − ā⁻) − (log(1 − e^{ā⁺}) − log(1 − e^{ā⁻})),        ā = L_θ(y)/|y| ≤ 0
    L      = NLL(x, y⁺) − λ·log σ(log OR),          λ = 0.1

The odds ratio uses the response tokens only (ā over y given x). The NLL term is the SFT loss of the chosen
sequence, and by default — as in the paper's code (xfactlab/orpo, unless ``--disable_prompt_loss``) and TRL's
``ORPOTrainer.concatenated_forward`` ("orpo chosen nll loss is computed over the full prompt and response") —
over *prompt and response*: every token of x ⊕ y⁺ after the first, the token mean −log π(x ⊕ y⁺)/(|x ⊕ y⁺| − 1).
``orpo.prompt_loss: false`` restricts it to the response: NLL = −ā⁺ (the official ``--disable_prompt_loss``).

log(1 − eˣ) is computed stably as log1mexp (Mächler 2012): log(−expm1(x)) for x > −ln 2, log1p(−eˣ) below,
so neither branch cancels catastrophically. ā is clamped just below 0: at exactly 0 the odds are infinite and
the gradient would be NaN.

Reduction: the NLL is a token mean *per pair*, and pairs are summed (the loop divides by the number of pairs),
so gradient accumulation stays exact. TRL takes one token mean over all chosen sequences of its batch instead;
the two agree exactly for a single pair, and for any batch whose chosen sequences have equal lengths. The
tests compare with TRL's `ORPOTrainer.get_batch_loss_metrics` on identical batches of a tiny model. Rewards for
metrics are λ·ā, as TRL logs them. No reference model is built.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from .logprobs import forward_hidden, head_logprobs, target_mask
from .pairwise import PairwiseObjective, PairwiseOptions


class ORPOOptions(PairwiseOptions):
    """The ``orpo:`` section."""

    moved_from: ClassVar[dict[str, str]] = {"pref.beta": "beta", "pref.orpo_prompt_loss": "prompt_loss"}

    beta: float = Field(0.1, gt=0)  # λ, the weight of the odds-ratio term
    prompt_loss: bool = True  # the NLL term over prompt + chosen response (the paper's code, TRL); false: response


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation on either side of −ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(ac: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    ac, ar = ac.clamp(max=-1e-6), ar.clamp(max=-1e-6)
    return (ac - ar) - (log1mexp(ac) - log1mexp(ar))


def orpo_losses(ac, ar, lam: float = 0.1, nll=None):
    """Per-pair ORPO loss from per-token average log-probs; returns (loss, log OR).

    `nll` is the per-pair NLL term; None means the response-only −ā⁺."""
    lor = log_odds_ratio(ac, ar)
    return (-ac if nll is None else nll) - lam * F.logsigmoid(lor), lor


def sequence_targets(batch: dict) -> torch.Tensor:
    """[B, T] bool: every token with a predecessor in its own sequence (prompt and response, no padding)."""
    if "seq_ids" in batch:
        seq = batch["seq_ids"]
        mask = seq >= 0
        mask[:, 1:] &= seq[:, 1:] == seq[:, :-1]  # a document's first token is never a target
    else:
        real = batch["attention_mask"].bool()
        mask = real.clone()
        mask[:, 1:] = real[:, 1:] & real[:, :-1]
    return target_mask(mask)


class ORPO(PairwiseObjective):
    name = "orpo"
    needs_reference = False
    default_beta = 0.1  # λ
    Options = ORPOOptions

    @classmethod
    def from_config(cls, cfg, reference=None):
        o = cls.options(cfg)
        return cls(o.beta, prompt_loss=o.prompt_loss, sft_weight=o.sft_weight, chunk_size=cfg.train.loss_chunk_size)

    def __init__(self, beta: float | None = None, prompt_loss: bool = True, **kw):
        super().__init__(beta, **kw)
        self.prompt_loss = prompt_loss
        self._full = None

    def policy_logps(self, model, batch: dict):
        """Response log-probs (for the odds ratio) and, with `prompt_loss`, the whole-sequence sums for the NLL,
        from one forward: the lm_head runs on all targets of prompt and response."""
        self._full = None
        if not self.prompt_loss:
            return super().policy_logps(model, batch)
        hidden, _ = forward_hidden(model, batch)  # LoReFT reads its prompt positions off the real loss_mask
        every = sequence_targets(batch)
        pos = every.nonzero(as_tuple=True)
        logp = head_logprobs(model, hidden[pos[0], pos[1] - 1], batch["input_ids"][pos], self.chunk_size)
        tok = torch.zeros(every.shape, dtype=torch.float32, device=hidden.device).index_put(pos, logp)
        resp = target_mask(batch["loss_mask"])
        self._full = (tok.sum(-1), every.sum(-1).to(tok.dtype).clamp(min=1))
        logps = torch.where(resp, tok, torch.zeros_like(tok)).sum(-1)
        return logps, resp.sum(-1).to(logps.dtype).clamp(min=1)

    def pair_losses(self, lc, lr, nc, nr, rc, rr, batch):
        ac, ar = lc / nc, lr / nr
        if self._full is not None:
            P = lc.shape[0]
            sums, counts = self._full
            nll = -sums[:P] / counts[:P]
        else:
            nll = -ac
        losses, lor = orpo_losses(ac, ar, self.beta, nll)
        extra = {"log_odds_ratio": float(lor.detach().mean()), "nll": float(nll.detach().mean())}
        return losses, self.beta * ac, self.beta * ar, extra

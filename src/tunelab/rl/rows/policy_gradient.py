"""GRPO / RLOO rows: every completion with one advantage, the sampler's log-probs as π_old and — when the KL
term is on (``grpo.beta`` > 0) — the reference's log-probs, computed once per round rather than once per pass.

Rows (B = prompts · G): `RowBuilder.sequences` with ``old_logprobs``, plus ``advantages`` [B] fp32 (the
estimator of ``rl.advantage`` or the objective's ``advantage_estimator``, over each prompt's group),
``prompt_index`` [B] long (rows of one prompt are scored with the prompt encoded once, `prompt_sharing`) and
``ref_logprobs`` [B, T] fp32 when β > 0.
"""

from __future__ import annotations

import torch

from ..advantages import BATCH_WIDE, ESTIMATORS
from ..collective import all_sum
from .base import Round, RoundRows, RowBuilder


class PolicyGradientRows(RowBuilder):
    group_relative = True  # group-normalised / leave-one-out advantages
    def __init__(self, cfg, context, micro: int):
        super().__init__(cfg, context, micro)
        name = context.objective.advantage_estimator  # the option, else the objective's
        self.estimator = ESTIMATORS[name]
        # REINFORCE++ normalises over the round: every rank's rows under torchrun (the group estimators need not)
        self.options = {"all_sum": all_sum} if name in BATCH_WIDE else {}

    def truncation_advice(self) -> str | None:
        if getattr(self.ctx.objective, "mask_truncated", False):
            return None
        return ("add the truncation reward (- {name: truncation, weight: 1.0}: −1 for a cut completion) or set "
                "grpo.mask_truncated: true (cut completions train nothing)")

    def build(self, rnd: Round) -> RoundRows:
        group = rnd.samples.prompt_index.cpu()
        rows = self.sequences(rnd.samples, list(range(len(rnd.rewards))), with_logprobs=True)
        options = dict(self.options)
        if self.options:  # REINFORCE++ whitens over tokens: each completion weighs its number of tokens
            options["token_counts"] = rnd.samples.completion_mask.sum(1).cpu()
        rows["advantages"] = self.estimator(rnd.rewards, group, **options).float()
        rows["prompt_index"] = group.long()
        settled = self.settle(rows, rnd)
        reference = getattr(self.ctx.objective, "reference", None)
        if self.ctx.objective.beta > 0 and reference is not None:
            device = next(self.ctx.model.parameters()).device
            keys = ("input_ids", "attention_mask", "position_ids", "loss_mask", "prompt_mask", "prompt_index")
            rows["ref_logprobs"] = torch.cat([
                reference.token_logprobs({k: rows[k][i:i + self.micro].to(device) for k in keys},
                                         temperature=self.cfg.rl.temperature,
                                         share_prompts=self.ctx.objective.share_prompts).cpu()
                for i in range(0, len(rnd.rewards), self.micro)])
        return RoundRows(rows, len(rnd.rewards), {"advantage_abs": float(rows["advantages"].abs().mean()), **settled})

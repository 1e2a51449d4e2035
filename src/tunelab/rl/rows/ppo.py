"""PPO rows: one rollout round → per-token rewards with the KL penalty, values, GAE, whitening (formulas in
`objectives/ppo.py`).

Rows (B = prompts · G completions, T = longest prompt + completion), on the CPU:

    input_ids, attention_mask, position_ids, loss_mask, prompt_mask, old_logprobs   `RowBuilder.sequences`
    ref_logprobs  [B, T] fp32 — log π_ref(y_t) (only when ppo.beta > 0)
    old_values    [B, T] fp32 — V_old at each completion token (the value model at the round's start)
    returns       [B, T] fp32 — GAE returns R_t = A_t + V_old,t (the value targets)
    advantages    [B, T] fp32 — GAE advantages, whitened over the round's completion tokens unless switched off
    round         [B]    long — the round index (the objective's approx-KL early stop is per round)
    round_kl      [B]    fp32 — the round's mean per-sequence KL(π_old ‖ π_ref), over every rank's rows
    round_sequences [B]  fp32 — the round's number of sequences, over every rank

The last two are what PPO's adaptive KL controller updates β from (`PPO.loss`, once per round): the builder only
reads β, the objective owns it. Under torchrun the round's statistics — reward normalisation, advantage
whitening and the controller's KL — are over every rank's rows (`rl.collective.all_sum`), so β stays the same on
every rank and N ranks × b rows reproduce one process with N·b.
"""

from __future__ import annotations

import torch

from ...models.modes import eval_mode
from ...objectives.grpo import token_kl
from ...objectives.logprobs import target_mask
from ...objectives.value import token_values
from ..advantages import gae, whiten
from ..collective import all_sum
from ..ppo_round import explained_variance, sequence_scores, token_rewards
from .base import Round, RoundRows, RowBuilder


@torch.no_grad()
def _forward_rows(fn, rows: dict, micro: int, device) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "position_ids", "loss_mask", "prompt_mask")
    B = rows["input_ids"].shape[0]
    return torch.cat([fn({k: rows[k][i:i + micro].to(device) for k in keys}).float().cpu()
                      for i in range(0, B, micro)])


class PPORows(RowBuilder):
    def truncation_advice(self) -> str | None:
        if self.cfg.ppo.missing_eot_penalty > 0:
            return None
        return "set ppo.missing_eot_penalty (default 0; p > 0 makes a cut completion's score s' = s − p)"

    def build(self, rnd: Round) -> RoundRows:
        p, rl, objective, model = self.cfg.ppo, self.cfg.rl, self.ctx.objective, self.ctx.model
        device = next(model.parameters()).device
        rows = self.sequences(rnd.samples, list(range(len(rnd.rewards))), with_logprobs=True)
        settled = self.settle(rows, rnd)  # before the KL below: π_old may be the trainer's
        mask = target_mask(rows["loss_mask"])
        beta = objective.kl.value  # read, never written: PPO updates its controller from round_kl
        # step 1. the reference's log-probs and the KL of the sampling policy to it, per token
        if p.beta > 0 and objective.reference is not None:
            rows["ref_logprobs"] = _forward_rows(
                lambda b: objective.reference.token_logprobs(b, temperature=rl.temperature), rows, self.micro, device)
            kl = token_kl(rows["old_logprobs"], rows["ref_logprobs"], p.kl_estimator) * mask
        else:
            kl = torch.zeros_like(rows["old_logprobs"])
        # step 2. per-token rewards: −β·KL, the (penalised, normalised, clipped) score at the last token
        scores = sequence_scores(rnd.rewards, rnd.truncated, p.missing_eot_penalty, p.reward_norm, p.reward_clip,
                                 all_sum=all_sum)
        r = token_rewards(scores, kl, mask, beta)
        # step 3. the value model's estimates at the round's start, then GAE and whitening over every rank's tokens
        with eval_mode(model):
            values = _forward_rows(lambda b: token_values(model, b), rows, self.micro, device) * mask
        adv, returns = gae(r, values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = whiten(adv, mask, all_sum=all_sum) * mask
        # step 4. the round's KL for the adaptive controller (β of the next round): mean per sequence, all ranks
        B = rows["input_ids"].shape[0]
        m = mask.float()
        seq_kl = (kl * m).sum(-1)
        sequences = all_sum(torch.tensor(float(B), dtype=torch.float64))
        round_kl = float(all_sum(seq_kl.double().sum()) / sequences)
        rows.update(old_values=values, returns=returns, advantages=adv,
                    round=torch.full((B,), rnd.index, dtype=torch.long),
                    round_kl=torch.full((B,), round_kl, dtype=torch.float32),
                    round_sequences=torch.full((B,), float(sequences), dtype=torch.float32))
        tokens = m.sum().clamp(min=1)
        metrics = {"kl": float((kl * m).sum() / tokens), "kl_seq": float(seq_kl.mean()), "kl_coef": beta,
                   "score": float(scores.mean()), "non_score_reward": float(-beta * seq_kl.mean()),
                   "entropy_sampled": float(-(rows["old_logprobs"] * m).sum() / tokens),  # −E log π_old(y)
                   "explained_variance": explained_variance(values, returns, mask),
                   "value_old_mean": float((values * m).sum() / tokens),
                   "return_mean": float((returns * m).sum() / tokens),
                   "advantage_abs": float((adv.abs() * m).sum() / tokens), **settled}
        return RoundRows(rows, B, metrics)

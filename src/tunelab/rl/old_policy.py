"""π_old and the train–inference mismatch: one no-grad *training* forward over a round's rows, right after sampling.

The sampler (`sampling.sample`: KV cache, one token at a time, other batch shapes) and the trainer's forward
(`logprobs.token_logprobs`: the whole sequence at once, chunked head) compute log π(y_t) of the same weights
by different kernels; with bf16, a separate inference engine or stale weights they differ. Every round, before
any update (the weights are still the sampler's), the rows are scored by the trainer's forward, at the sampling
temperature, in eval mode (no dropout), in the loop's precision (`models.modes.training_autocast`: bf16 autocast on
CUDA over fp32 weights — the sampler itself runs outside it, so on a GPU the mismatch includes that), and

    mismatch_kl, mismatch_max_abs_logp     (objectives/policy_loss.py `mismatch`, over the completion tokens)

go into the round's metrics (every step of the round logs them); under torchrun over every rank's tokens (the
mean a global token mean, the max a true max: `rl.collective.all_sum`/`all_max`, so the loop's mean over ranks
leaves them as they are). With ``grpo.recompute_old_logprobs`` (rloo/ppo alike) the trainer's
log-probs then *replace* the sampler's as π_old in the importance ratio — what TRL (``old_per_token_logps``,
computed when a generation batch is used for more than one step) and verl (``actor.compute_log_prob`` before the
update) do — so the ratio measures only the policy's own movement, not the kernels' disagreement. Off (the
default), π_old is the sampler's log-prob, and the ratio's first value is exp(−mismatch) rather than 1.

Cost: one forward of the round's rows without gradient (no backward), small next to generating them.

results.json (and the comparison report's table) gets the run's summary (`summarize`): ``mismatch_kl`` (mean
over the logged steps) and ``mismatch_max_abs_logp`` (max over them).
"""

from __future__ import annotations

import torch

from ..models.modes import eval_mode, training_autocast
from ..objectives.policy_loss import mismatch
from ..objectives.prompt_sharing import group_token_logprobs
from .collective import all_max, all_sum

KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask", "prompt_mask", "prompt_index")


@torch.no_grad()
def trainer_logprobs(model, rows: dict, micro: int, temperature: float, chunk_size: int = 1024,
                     share_prompts: bool = True) -> torch.Tensor:
    """log π_θ(y_t) [B, T] fp32 on the CPU of the rows' target tokens by the training forward (0 off the mask)."""
    device = next(model.parameters()).device
    B = rows["input_ids"].shape[0]
    out = []
    with eval_mode(model), training_autocast(model):  # the loop's precision (bf16 autocast on CUDA)
        for i in range(0, B, micro):
            part = {k: rows[k][i:i + micro].to(device) for k in KEYS if k in rows}
            out.append(group_token_logprobs(model, part, chunk_size, temperature=temperature,
                                            share=share_prompts).float().cpu())
    return torch.cat(out)


def settle_old_logprobs(rows: dict, model, objective, cfg, micro: int) -> dict[str, float]:
    """Score `rows` with the trainer, return the mismatch metrics; with the objective's ``recompute_old_logprobs``
    replace ``rows["old_logprobs"]`` (the sampler's) by the trainer's. `rows` as rl/rollout.py builds them."""
    trainer = trainer_logprobs(model, rows, micro, cfg.rl.temperature, cfg.train.loss_chunk_size,
                               objective.share_prompts)
    mask = rows["loss_mask"].clone()
    mask[:, 0] = False
    metrics = mismatch(rows["old_logprobs"], trainer, mask, all_sum, all_max)  # over every rank's tokens
    if objective.recompute_old_logprobs:
        rows["old_logprobs"] = trainer.masked_fill(~mask, 0.0)
    return metrics


def summarize(rows: list[dict]) -> dict[str, float]:
    """The run's mismatch from its metrics.jsonl rows: mean ``mismatch_kl``, max ``mismatch_max_abs_logp``."""
    kl = [r["mismatch_kl"] for r in rows if "mismatch_kl" in r]
    mx = [r["mismatch_max_abs_logp"] for r in rows if "mismatch_max_abs_logp" in r]
    if not kl:
        return {}
    return {"mismatch_kl": sum(kl) / len(kl), "mismatch_max_abs_logp": max(mx)}

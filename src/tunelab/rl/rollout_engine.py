"""Which sampler generates a run's rollouts (`rl.sampler`), and how far its log-probs are from the trainer's.

`build_sampler` validates `rl.sampler` against the registry (`rl.sampler.SAMPLERS`; "vllm" registers itself when
`rl/vllm_sampler.py` is imported, which happens only when it is asked for: vLLM lives in its own venv).

`mismatch_metrics` measures the train-inference mismatch of an outside sampler on a round's rows: the sampler's
log-probs p_s of the tokens it sampled (π_old) against the trainer's p_t of the same tokens under the same weights
and temperature (one no-grad scoring forward). With d = log p_t − log p_s per completion token:

    mismatch_kl            mean(exp(d) − 1 − d) — k3 (Schulman 2020, "Approximating KL divergence"), an unbiased,
                           non-negative estimate of KL(π_sampler ‖ π_trainer) from tokens sampled by π_sampler;
    mismatch_max_abs_logp  max |d|.

Both are 0 for the torch sampler (the trainer's own forward), so they are only computed for the others. A large
mismatch biases the policy-gradient ratio π_θ/π_old away from 1 at the first step of a round (Yao et al. 2025,
"Your efficient RL framework secretly brings you off-policy RL training").
"""

from __future__ import annotations

import torch

from ..errors import TunelabError
from ..models.modes import eval_mode
from ..objectives.logprobs import token_logprobs
from .sampler import SAMPLERS


def build_sampler(cfg, context, batch_size: int):
    name = cfg.rl.sampler
    if name == "vllm":
        if cfg.rl.top_p < 1.0:  # before a minute of loading: vLLM's log-probs would be of the renormalised nucleus
            raise TunelabError(f"rl.top_p={cfg.rl.top_p}: rl.sampler vllm returns log-probs of the nucleus-"
                               "renormalised distribution when top_p < 1, not π_old; use top_p 1.0 or "
                               "rl.sampler: torch")
        from . import vllm_sampler  # noqa: F401  (registers "vllm")

        return SAMPLERS[name](context.model, context.tokenizer, batch_size,
                              max_model_len=cfg.data.max_length + cfg.rl.max_new_tokens)
    if name not in SAMPLERS:
        names = ", ".join(sorted({*SAMPLERS, "vllm"}))
        raise TunelabError(f"rl.sampler: unknown sampler '{name}' (choose from {names})")
    return SAMPLERS[name](context.model, context.tokenizer, batch_size)


@torch.no_grad()
def mismatch_metrics(model, rows: dict, temperature: float, micro: int) -> dict:
    """{"mismatch_kl", "mismatch_max_abs_logp"} of `rows` (a round's policy-gradient rows, with old_logprobs)."""
    device = next(model.parameters()).device
    keys = ("input_ids", "attention_mask", "position_ids", "loss_mask")
    kl, worst, count = 0.0, 0.0, 0
    with eval_mode(model):
        for i in range(0, rows["input_ids"].shape[0], micro):
            batch = {k: rows[k][i:i + micro].to(device) for k in keys}
            trainer = token_logprobs(model, batch, temperature=temperature).float().cpu()
            mask = rows["loss_mask"][i:i + micro].clone()
            mask[:, 0] = False
            d = (trainer - rows["old_logprobs"][i:i + micro])[mask]
            kl += float((d.exp() - 1 - d).sum())
            worst = max(worst, float(d.abs().max())) if d.numel() else worst
            count += int(d.numel())
    return {"mismatch_kl": kl / max(count, 1), "mismatch_max_abs_logp": worst}

"""Per-token log-probabilities without materialising `[batch, seq, vocab]` logits.

Every objective needs log π(y_t | y_<t) on a subset of positions (the loss tokens). A 135M model with a 49k
vocabulary at batch 8 × 1024 tokens would need 1.6 GB of fp32 logits (3× that with softmax and gradients).
Instead we

1. run the decoder body once to get hidden states `h` [B, T, H];
2. gather only the positions whose *next* token is a target (`loss_mask[:, 1:]`);
3. apply the lm_head + log-softmax in chunks of `chunk_size` rows, each chunk under activation
   checkpointing, so at most one `[chunk, vocab]` block of logits is alive in forward *and* backward.

The result is exact (same math as `F.cross_entropy` on full logits), which tests check.
Shared by SFT, the preference objectives, evaluation and RL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..adapters.base import linear_params
from ..adapters.loreft import batch_positions


def decoder(model):
    """The transformer body of a causal LM (everything before the lm_head)."""
    return getattr(model, model.base_model_prefix)


def forward_hidden(model, batch: dict) -> tuple[torch.Tensor, object]:
    """Hidden states [B, T, H] of the last layer (after the final norm) and the raw body output."""
    # LoReFT intervenes on prompt positions only, which it reads off this batch's loss mask (no-op otherwise)
    with batch_positions(model, batch):
        out = decoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch.get("position_ids"), use_cache=False)
    return out.last_hidden_state, out


def _chunk_logp(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias, softcap: float | None):
    logits = F.linear(h, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return -F.cross_entropy(logits, targets, reduction="none")


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log p(target) for rows of `hidden` [N, H] → [N] (fp32), the lm_head applied chunk by chunk."""
    # adapter-aware: a LoRA on lm_head, or a fully trained head under `disabled()`, must be respected
    weight, bias = linear_params(model.get_output_embeddings())
    softcap = getattr(model.config, "final_logit_softcapping", None)
    outs = []
    for i in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[i:i + chunk_size], targets[i:i + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            outs.append(checkpoint(_chunk_logp, h, t, weight, bias, softcap, use_reentrant=False))
        else:
            outs.append(_chunk_logp(h, t, weight, bias, softcap))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


def token_logprobs(model, batch: dict, chunk_size: int = 1024, return_output: bool = False):
    """Log-probs of each target token, as a [B, T] fp32 tensor (0 where `loss_mask` is False).

    `loss_mask[b, t]` True means token t is predicted from position t-1 (the first token never is).
    """
    hidden, out = forward_hidden(model, batch)
    mask = batch["loss_mask"].clone()
    mask[:, 0] = False
    pos = mask.nonzero(as_tuple=True)
    h = hidden[pos[0], pos[1] - 1]
    logp = head_logprobs(model, h, batch["input_ids"][pos], chunk_size)
    full = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    full = full.index_put(pos, logp)
    return (full, out) if return_output else full


def sequence_logprobs(token_lp: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probs and number of target tokens per sequence ([B] each; one sequence per row)."""
    mask = batch["loss_mask"].clone()
    mask[:, 0] = False
    return token_lp.sum(-1), mask.sum(-1)

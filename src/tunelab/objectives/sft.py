"""Supervised finetuning: next-token negative log-likelihood on the loss tokens.

    L = − Σ_t m_t · log π_θ(x_t | x_<t)   /   Σ_t m_t

with m_t the loss mask chosen by the masking mode (prompt / none / template; see `data/masking.py`). For
mixture-of-experts models (Mixtral) the router load-balancing loss of Switch Transformers (Fedus et al. 2021),
weighted by the model's `router_aux_loss_coef`, is added per loss token so it survives normalisation.
"""

from __future__ import annotations

import torch

from .logprobs import token_logprobs


def router_aux_loss(model, out, batch) -> torch.Tensor | None:
    logits = getattr(out, "router_logits", None)
    if not logits:
        return None
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = model.config
    mask = batch["attention_mask"] if batch["attention_mask"].dim() == 2 else None
    return load_balancing_loss_func(logits, cfg.num_local_experts, cfg.num_experts_per_tok, mask)


class SFT:
    name = "sft"

    def __init__(self, chunk_size: int = 1024):
        self.chunk_size = chunk_size

    def loss(self, model, batch):
        lp, out = token_logprobs(model, batch, self.chunk_size, return_output=True)
        n = batch["loss_mask"][:, 1:].sum()
        loss_sum = -lp.sum()
        metrics = {}
        aux = router_aux_loss(model, out, batch)
        if aux is not None:
            coef = getattr(model.config, "router_aux_loss_coef", 0.01)
            loss_sum = loss_sum + coef * aux * n
            metrics["router_aux_loss"] = float(aux.detach())
        return loss_sum, n, metrics

"""Supervised finetuning: next-token negative log-likelihood on the loss tokens.

    L = − Σ_t m_t · log π_θ(x_t | x_<t)   /   Σ_t m_t   (+ coef · aux for mixture-of-experts models)

with m_t the loss mask chosen by the masking mode (prompt / none / template; see `data/masking.py`).

Mixture-of-experts models (Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE, …) train with the router load-balancing
loss of Switch Transformers (Fedus et al. 2021) added, weighted by the model's `router_aux_loss_coef`, exactly
as their own forward does with `labels` — which it only does when `output_router_logits` is on, and real
checkpoints ship with it off. So the router logits are requested here for every model whose architecture
defines that loss (whatever its config says), the loss is computed by the architecture's own
`load_balancing_loss_func` over the non-padding tokens, and it is logged as the metric `router_aux_loss`.
It is added per loss token so it survives the loop's normalisation. `router_aux_loss_coef: 0` turns it off.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import TunelabError
from .base import RunHooks
from .logprobs import token_logprobs
from .scoring import HeldOutLoss


@dataclass(frozen=True)
class RouterAux:
    """How a mixture-of-experts model's own forward computes its load-balancing loss."""

    fn: Callable  # the architecture's load_balancing_loss_func
    num_experts: int
    top_k: int
    coef: float

    def __call__(self, router_logits, attention_mask) -> torch.Tensor:
        extra = {}
        if "num_keys" in inspect.signature(self.fn).parameters:  # Doge's product-key experts
            extra["num_keys"] = math.floor(math.sqrt(self.num_experts))
        return self.fn(router_logits, num_experts=self.num_experts, top_k=self.top_k,
                       attention_mask=attention_mask, **extra)


def _first(objs, names):
    for obj in objs:
        for name in names:
            value = getattr(obj, name, None)
            if value is not None:
                return value
    return None


def router_aux(model) -> RouterAux | None:
    """The load-balancing loss `model` trains with, or None (a dense model, or a coefficient of 0).

    Read like the model's *ForCausalLM does: its `load_balancing_loss_func`, and the expert count, top-k and
    coefficient it stores (falling back to the text config, as multimodal MoE models do)."""
    fn = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    if fn is None:
        return None
    name = type(model).__name__
    params = inspect.signature(fn).parameters
    if not {"num_experts", "top_k", "attention_mask"} <= set(params):
        raise TunelabError(f"{name}: its router load-balancing loss has an unfamiliar signature "
                           f"({', '.join(params)}); tunelab cannot add it")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    objs = (model, text)
    coef = _first(objs, ("router_aux_loss_coef", "aux_loss_coef"))
    if coef is None or float(coef) == 0:
        return None
    num_experts = _first(objs, ("num_experts", "num_local_experts"))
    top_k = _first(objs, ("num_experts_per_tok",))
    if num_experts is None or top_k is None:
        raise TunelabError(f"{name}: router_aux_loss_coef is set but the expert count or top-k is missing from "
                           "the config; cannot compute the router load-balancing loss")
    return RouterAux(fn, int(num_experts), int(top_k), float(coef))


def router_aux_loss(model, out, batch, aux: RouterAux | None = None) -> torch.Tensor | None:
    """The load-balancing loss (without its coefficient) on the body output `out`, or None for a dense model."""
    aux = aux or router_aux(model)
    logits = getattr(out, "router_logits", None)
    if aux is None or not logits:
        return None
    mask = batch["attention_mask"] if batch["attention_mask"].dim() == 2 else None
    return aux(tuple(logits), mask)


class SFT(HeldOutLoss, RunHooks):
    name = "sft"
    data_kind = "sft"
    nll_loss = True
    rows_additive = True  # loss_sum and n are sums over rows: the loop may run a batch row by row (memory mode)

    def __init__(self, chunk_size: int = 1024):
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, cfg, reference=None):
        return cls(cfg.train.loss_chunk_size)

    def loss(self, model, batch):
        aux_spec = router_aux(model)
        lp, out = token_logprobs(model, batch, self.chunk_size, return_output=True,
                                 router_logits=aux_spec is not None)
        n = batch["loss_mask"][:, 1:].sum()
        loss_sum = -lp.sum()
        metrics = {}
        if aux_spec is not None:
            aux = router_aux_loss(model, out, batch, aux_spec)
            if aux is None:
                raise TunelabError(f"{type(model).__name__}: the model returned no router logits, so its "
                                   "load-balancing loss cannot be added")
            loss_sum = loss_sum + aux_spec.coef * aux * n
            metrics["router_aux_loss"] = float(aux.detach())
        return loss_sum, n, metrics

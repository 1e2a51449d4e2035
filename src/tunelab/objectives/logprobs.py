"""Per-token log-probabilities without materialising `[batch, seq, vocab]` logits.

Every objective needs log π(y_t | y_<t) on a subset of positions (the loss tokens). A 135M model with a 49k
vocabulary at batch 8 × 1024 tokens would need 1.6 GB of fp32 logits (3× that with softmax and gradients).
Instead we

1. run the decoder body once to get hidden states `h` [B, T, H];
2. gather only the positions whose *next* token is a target (`loss_mask[:, 1:]`);
3. apply the lm_head + log-softmax in chunks of `chunk_size` rows, every chunk but the last under activation
   checkpointing, so at most one `[chunk, vocab]` block of logits is alive in forward *and* backward: the
   checkpointed chunks free theirs after forward and rebuild it one at a time in backward; the last chunk keeps
   its block from forward to backward (the first chunk backward reaches), where recomputing it would only redo
   work while no other block is alive anyway — one chunk's lm_head + log-softmax saved per step.

The result is exact (same math as `F.cross_entropy` on full logits), which tests check.
Shared by SFT, the preference objectives, evaluation and RL.

Some architectures do more than `lm_head(h)` to get their logits: Granite divides by `logits_scaling`, Cohere
multiplies by `logit_scale`, Gemma 2 soft-caps with `final_logit_softcapping`, … `logit_transform(model)`
says what the model's own forward does (`LogitTransform`), every head here applies it, and an architecture
whose head does something else that is not reproduced here is refused rather than scored wrongly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..adapters.base import batch_context, linear_params
from ..errors import TunelabError
from ..models.attention import attention_inputs


def decoder(model):
    """The transformer body of a causal LM (everything before the lm_head)."""
    return getattr(model, model.base_model_prefix)


def forward_hidden(model, batch: dict, router_logits: bool = False) -> tuple[torch.Tensor, object]:
    """Hidden states [B, T, H] of the last layer (after the final norm) and the raw body output.

    `router_logits`: also return a mixture-of-experts body's router logits (`out.router_logits`), which real
    checkpoints do not by default (`output_router_logits: false`); the SFT load-balancing loss needs them.
    The batch's mask reaches the model in its cheapest exact form (`models.attention.attention_inputs`: no mask
    for right-padded rows, per-document spans for packed ones), so CPU SDPA runs its fused causal kernel."""
    extra = {"output_router_logits": True} if router_logits else {}
    # a method that needs to see the batch gets it here (LoReFT: the prompt positions to intervene); no-op otherwise
    with batch_context(model, batch):
        out = decoder(model)(input_ids=batch["input_ids"], use_cache=False, **attention_inputs(model, batch),
                             **extra)
    return out.last_hidden_state, out


# ------------------------------------------------------------------------------ the model's own output head
@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM's forward does around its lm_head, as transformers' modeling code does it:

        logits = softcap( lm_head(h / hidden_divisor) · multiplier / divisor ),   softcap(z) = c · tanh(z / c)

    Neutral values (1, 1, 1, None) are the plain `lm_head(h)` of most architectures."""

    hidden_divisor: float = 1.0   # MiniCPM3: h / logits_scaling before the head
    multiplier: float = 1.0       # Cohere: logit_scale; Falcon-H1: lm_head_multiplier; HyperCLOVA X: logits_scaling
    divisor: float = 1.0          # Granite family: logits_scaling
    softcap: float | None = None  # Gemma 2 & co: final_logit_softcapping; RecurrentGemma: logits_soft_cap

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.hidden_divisor == 1 else h / self.hidden_divisor

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiplier != 1:
            logits = logits * self.multiplier
        if self.divisor != 1:
            logits = logits / self.divisor
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# model_type → the transform its *ForCausalLM / *ForConditionalGeneration applies (read off transformers' code)
_DIVIDE_BY_LOGITS_SCALING = {"granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared",
                             "granitemoehybrid", "granite4_vision", "granite_docling"}
_COHERE = {"cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"}
_IGNORES_SOFTCAP = {"gemma3"}  # Gemma3ForConditionalGeneration never applies final_logit_softcapping
_REFUSED = {
    "inkling_text": "divides the hidden states by logits_mup_width_multiplier and drops padded vocabulary logits",
    "inkling_mm_model": "divides the hidden states by logits_mup_width_multiplier and drops padded vocabulary logits",
    "modernbert-decoder": "runs a dense+norm prediction head before its output projection",
}
# Config fields that transform logits in some architecture, with their neutral value. One that is set on a
# model whose rule above does not consume it means a transform tunelab would silently skip: refused.
_TRANSFORM_FIELDS = {"logits_scaling": 1, "logit_scale": 1, "lm_head_multiplier": 1, "output_multiplier": 1,
                     "logits_mup_width_multiplier": 1, "final_logit_softcapping": None, "logits_soft_cap": None,
                     "output_logit_soft_cap": None, "dim_model_base": None}


def _number(value, field: str, model_type: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TunelabError(f"{model_type}: config field {field}={value!r} is not a number; cannot apply the "
                           "model's logit transform") from None
    if not math.isfinite(out) or out == 0:
        raise TunelabError(f"{model_type}: config field {field}={value!r} is not a usable logit scale")
    return out


def logit_transform(model) -> LogitTransform:
    """The transform `model`'s own forward applies to its lm_head output (see `LogitTransform`).

    Raises TunelabError for an architecture whose head does something else, so that log-probs are never
    computed from a different distribution than the model's."""
    config = model.config
    model_type = getattr(config, "model_type", "") or type(model).__name__
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if model_type in _REFUSED:
        raise TunelabError(f"{model_type}: its output head {_REFUSED[model_type]}, which tunelab's chunked "
                           "log-probs do not reproduce")
    head = model.get_output_embeddings()
    if head is None or not any(child is head for child in model.children()):
        raise TunelabError(f"{model_type}: the output projection is not applied directly to the decoder's "
                           "hidden states, which tunelab's chunked log-probs assume")
    kw, used = {}, set()
    if model_type in _DIVIDE_BY_LOGITS_SCALING:
        kw["divisor"], used = _number(text.logits_scaling, "logits_scaling", model_type), {"logits_scaling"}
    elif model_type in _COHERE:
        scale = getattr(model, "logit_scale", getattr(text, "logit_scale", None))  # the module's own copy
        kw["multiplier"] = 1.0 if scale is None else _number(scale, "logit_scale", model_type)
        used = {"logit_scale"}
    elif model_type == "hyperclovax":
        kw["multiplier"], used = _number(text.logits_scaling, "logits_scaling", model_type), {"logits_scaling"}
    elif model_type == "falcon_h1":
        mult = getattr(decoder(model), "lm_head_multiplier", text.lm_head_multiplier)
        kw["multiplier"], used = _number(mult, "lm_head_multiplier", model_type), {"lm_head_multiplier"}
    elif model_type == "minicpm3":
        kw["hidden_divisor"] = _number(text.logits_scaling, "logits_scaling", model_type)
        used = {"logits_scaling", "dim_model_base"}
    elif model_type == "mpt":
        used = {"logit_scale"}  # MptForCausalLM ignores it (only MosaicML's remote code applied it)
    cap_field = "logits_soft_cap" if model_type == "recurrent_gemma" else "final_logit_softcapping"
    used = used | {cap_field}
    cap = getattr(text, cap_field, None)
    if cap is not None and model_type not in _IGNORES_SOFTCAP:
        kw["softcap"] = _number(cap, cap_field, model_type)
    for field, neutral in _TRANSFORM_FIELDS.items():
        value = getattr(text, field, None)
        if field in used or value is None or value == neutral:
            continue
        if field == "dim_model_base" and value == getattr(text, "hidden_size", None):
            continue
        raise TunelabError(f"{model_type}: config field {field}={value!r} changes the model's logits in a way "
                           "tunelab's chunked log-probs do not reproduce")
    return LogitTransform(**kw)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias, transform: LogitTransform) -> torch.Tensor:
    """fp32 logits of the rows of `hidden`, exactly as the model's forward makes them (`transform`)."""
    return transform(F.linear(transform.hidden(hidden), weight, bias).float())


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None, LogitTransform]:
    """(weight, bias, transform) of the model's output head, adapter-aware: a LoRA on lm_head, or a fully
    trained head under `disabled()`, is respected."""
    weight, bias = linear_params(model.get_output_embeddings())
    return weight, bias, logit_transform(model)


def _chunk_logp(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias, transform: LogitTransform,
                temperature: float = 1.0, with_entropy: bool = False):
    logits = head_logits(h, weight, bias, transform)
    if temperature != 1.0:
        logits = logits / temperature
    logp = -F.cross_entropy(logits, targets, reduction="none")
    if not with_entropy:
        return logp
    # H = −Σ_v p_v log p_v of the same distribution, while its logits exist anyway (a metric: no gradient,
    # unless with_entropy == "grad": an entropy bonus in the loss differentiates it)
    with contextlib.nullcontext() if with_entropy == "grad" else torch.no_grad():
        log_all = logits.log_softmax(dim=-1)
        entropy = -(log_all.exp() * log_all).sum(-1)
    return logp, entropy


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
                  temperature: float = 1.0, with_entropy: bool = False):
    """log p(target) for rows of `hidden` [N, H] → [N] (fp32), the lm_head applied chunk by chunk.

    `temperature`: log_softmax(logits / temperature), the model's own logits (after its transform) divided as
    the sampler divides them — what online RL scores its samples with (1: the plain distribution).
    `with_entropy`: also return the entropy [N] (detached) of each row's whole next-token distribution;
    ``"grad"``: with its gradient (an entropy bonus)."""
    weight, bias, transform = output_head(model)
    outs = []
    n = hidden.shape[0]
    for i in range(0, n, chunk_size):
        h, t = hidden[i:i + chunk_size], targets[i:i + chunk_size]
        last = i + chunk_size >= n  # its block stays alive until backward, which starts with it: no recompute
        if not last and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            outs.append(checkpoint(_chunk_logp, h, t, weight, bias, transform, temperature, with_entropy,
                                   use_reentrant=False))
        else:
            outs.append(_chunk_logp(h, t, weight, bias, transform, temperature, with_entropy))
    if with_entropy:
        if not outs:
            empty = hidden.sum(-1).float()
            return empty, empty.detach()
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    # no target at all (a micro-batch whose rows are all masked out, e.g. rejection sampling rejecting them all):
    # an empty result that is still part of the graph, so that the loss it sums to can be backpropagated (0 grads)
    return torch.cat(outs) if outs else hidden.sum(-1).float()


def target_mask(mask: torch.Tensor) -> torch.Tensor:
    """The loss targets of a `loss_mask`-style [B, T] mask, as a new bool tensor: the first position of a row is
    never a target, since no position precedes it to predict it from (`loss_mask[t]` means token t is predicted
    from position t − 1). Every objective, evaluation and RL round takes its targets through this rule."""
    out = mask.bool().clone()
    out[:, 0] = False
    return out


def token_logprobs(model, batch: dict, chunk_size: int = 1024, return_output: bool = False,
                   router_logits: bool = False, temperature: float = 1.0, return_entropy: bool = False):
    """Log-probs of each target token, as a [B, T] fp32 tensor (0 where `loss_mask` is False).

    `loss_mask[b, t]` True means token t is predicted from position t-1 (the first token never is).
    `router_logits`: see `forward_hidden` (only for a mixture-of-experts model).
    `temperature`: see `head_logprobs` (online RL scores samples at the sampling temperature).
    `return_entropy`: also return the [B, T] entropy (detached; 0 off the mask) of the distribution each target
    token was drawn from — ``(logp, entropy)``, or ``(logp, entropy, output)`` with `return_output`.
    """
    hidden, out = forward_hidden(model, batch, router_logits)
    mask = target_mask(batch["loss_mask"])
    pos = mask.nonzero(as_tuple=True)
    scored = scatter_logprobs(model, hidden, (pos[0], pos[1] - 1), batch["input_ids"], pos, chunk_size,
                              temperature, return_entropy)
    if return_entropy:
        return (*scored, out) if return_output else scored
    return (scored, out) if return_output else scored


def scatter_logprobs(model, hidden: torch.Tensor, sources: tuple, input_ids: torch.Tensor, targets: tuple,
                     chunk_size: int = 1024, temperature: float = 1.0, return_entropy: bool = False):
    """log p(input_ids[targets]) as a [B, T] fp32 tensor like `input_ids` (0 elsewhere), target k predicted from
    the hidden state ``hidden[sources[0][k], sources[1][k]]``; with `return_entropy`, ``(logp, entropy)``.

    `token_logprobs` predicts each target from the position before it in the same row (sources = targets
    shifted by one); a layout that moves tokens around (`prompt_sharing`: several completions after one
    encoded prompt) names its own sources while the results land in the batch's [B, T] layout."""
    h = hidden[sources[0], sources[1]]
    scored = head_logprobs(model, h, input_ids[targets], chunk_size, temperature, with_entropy=return_entropy)
    logp, entropy = scored if return_entropy else (scored, None)
    full = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device)
    full = full.index_put(targets, logp)
    if return_entropy:
        ent = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device).index_put(targets, entropy)
        return full, ent
    return full


def sequence_logprobs(token_lp: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probs and number of target tokens per sequence ([B] each; one sequence per row)."""
    return token_lp.sum(-1), target_mask(batch["loss_mask"]).sum(-1)

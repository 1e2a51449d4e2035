"""Score the G completions of a prompt with the prompt encoded once ("prompt sharing"), exactly.

Online RL's rows (rl/rollout.py) are one per completion, ``[prompt | completion_k]``: with G completions per
prompt the decoder encodes every prompt G times, in the update's forward and backward and in the reference's
log-probs. Rows of one prompt (same ``prompt_index``) are packed into one row instead:

    [ prompt (P tokens) | c_1 (L_1) | c_2 (L_2) | … | c_G (L_G) | padding ]

Why this is exact. In a causal decoder the hidden state of a token is a function of the tokens it attends to and
their positions. In the per-completion row, prompt token i attends prompt tokens ≤ i, and completion token
c_k[j] attends the whole prompt and c_k[0..j]. The packed row reproduces both, with

    position_ids   prompt: its own positions (0..P−1 for an unpadded prompt); c_k[j]: the position it had in
                   its own row (P + j) — every completion continues from the prompt, RoPE is unchanged;
    attention      query q may attend key κ  ⇔  κ ≤ q  and  (κ is a prompt token  or  κ, q in the same c_k),
                   a [N, 1, W, W] boolean mask (padding attends to itself only, so no softmax row is empty):
                   the prompt is causal over itself, a completion never sees its siblings.

So every real token gets the same hidden state as in its own row (up to floating-point summation order), and
the prompt's hidden states — identical in the G rows — are computed once. The backward pass is exact too: the
prompt's activations receive the sum of the G completions' gradients, which is what the G copies received.

Targets. Token t of a row is predicted from position t − 1 of that row (`logprobs.token_logprobs`). In the
packed row that position is c_k[j−1] for j > 0, but for the first completion token it is the prompt's *last*
position (not the previous sibling's last token). Each target is therefore scored from an explicit source
position (`logprobs.scatter_logprobs`) and the log-probs (and entropies) land in the batch's own [B, T] layout,
so losses, ratios, KL and metrics downstream are unchanged.

Grouping. The prefix of a row is its real tokens before its first target; rows of one ``prompt_index`` share
only if their prefixes have the same ids and positions (checked, so a wrong index cannot change results). A
micro-batch holding part of a group shares within that part; a group of one is just its own row. Rows with no
target are left out (nothing to score). Nothing is shared — `token_logprobs` runs as before — when no group
has two rows, or the model cannot take the layout exactly (`shares_exactly`): attention other than SDPA (eager
would add the boolean mask, flash kernels ignore it), a sliding window, an architecture outside the ones known
to be plain full-attention decoders (recurrent/SSM layers would mix the siblings), or an adapter method that
reads the batch layout (LoReFT intervenes on prompt positions of the rows it is given).

With dropout on (LoRA dropout while training) the G completions see one dropout mask on the prompt instead of G
independent ones: the same distribution per completion, correlated across siblings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import reads_batch
from .logprobs import forward_hidden, scatter_logprobs, target_mask, token_logprobs

# Plain decoders whose layers are full causal self-attention with RoPE positions from `position_ids` and that
# take a prepared 4-D mask as given (transformers 5.x `create_causal_mask` returns it unchanged). Only the ones
# the tests check (shared = unshared on a tiny model of each, tests/objectives/test_prompt_sharing.py) are listed;
# any other architecture keeps one row per completion.
SHAREABLE_ARCHS = frozenset({"llama", "mistral", "qwen2", "phi3", "gemma", "mixtral", "qwen2_moe", "qwen3_moe",
                             "olmoe", "granite", "cohere"})


def shares_exactly(model) -> bool:
    """Can `model` score the shared layout with the same result as the per-completion rows?"""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) not in SHAREABLE_ARCHS:
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    layer_types = getattr(text, "layer_types", None) or []
    if getattr(text, "sliding_window", None) is not None or any(t != "full_attention" for t in layer_types):
        return False
    return not reads_batch(model)


@dataclass
class SharedLayout:
    """The packed rows and where each target of the original batch is scored from."""

    packed: dict            # input_ids [N, W], attention_mask [N, 1, W, W] bool, position_ids [N, W]
    sources: tuple          # (packed row, packed column) of the hidden state predicting each target
    targets: tuple          # (row, column) of each target in the batch, row-major (like `token_logprobs`)


def _groups(batch: dict, ids, pos, real, tmask) -> list[list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """Rows (index, prefix columns, suffix columns) per group: same `prompt_index` *and* the same prefix tokens
    and positions (a wrong index can split a group, never merge different prompts)."""
    groups: dict = {}
    index = batch["prompt_index"].tolist()
    for b in range(ids.shape[0]):
        tgt = tmask[b].nonzero().flatten()
        if not len(tgt):
            continue
        cols = real[b].nonzero().flatten()
        prefix, suffix = cols[cols < tgt[0]], cols[cols >= tgt[0]]
        key = (index[b], tuple(ids[b, prefix].tolist()), tuple(pos[b, prefix].tolist()))
        groups.setdefault(key, []).append((b, prefix, suffix))
    return list(groups.values())


def shared_layout(batch: dict) -> SharedLayout | None:
    """The packed layout of `batch` (see the module docstring), or None when it would share nothing or the
    rows do not fit it (a 4-D mask, no ``prompt_index``, a target that is padding or follows padding)."""
    if batch.get("prompt_index") is None or batch["attention_mask"].dim() != 2:
        return None
    device = batch["input_ids"].device
    ids, real = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    pos = batch.get("position_ids")
    pos = (real.long().cumsum(-1) - 1).clamp(min=0) if pos is None else pos.cpu()
    tmask = target_mask(batch["loss_mask"].cpu())
    if bool((tmask & ~real).any()) or bool((tmask[:, 1:] & ~real[:, :-1]).any()):
        return None
    groups = _groups(batch, ids, pos, real, tmask)
    if not any(len(g) >= 2 for g in groups):
        return None
    widths = [len(g[0][1]) + sum(len(s) for _, _, s in g) for g in groups]
    N, W = len(groups), max(widths)
    B, T = ids.shape
    p_ids = torch.zeros(N, W, dtype=ids.dtype)
    p_pos = torch.zeros(N, W, dtype=torch.long)
    segment = torch.full((N, W), -1, dtype=torch.long)  # −1 padding, 0 prompt, k ≥ 1 completion k
    row_of = torch.zeros(B, dtype=torch.long)
    col_of = torch.full((B, T), -1, dtype=torch.long)
    for n, group in enumerate(groups):
        b0, prefix0, _ = group[0]
        P = len(prefix0)
        p_ids[n, :P], p_pos[n, :P], segment[n, :P] = ids[b0, prefix0], pos[b0, prefix0], 0
        offset = P
        for k, (b, prefix, suffix) in enumerate(group, start=1):
            L = len(suffix)
            p_ids[n, offset:offset + L], p_pos[n, offset:offset + L] = ids[b, suffix], pos[b, suffix]
            segment[n, offset:offset + L] = k
            row_of[b] = n
            col_of[b, prefix] = torch.arange(P)
            col_of[b, suffix] = torch.arange(offset, offset + L)
            offset += L
    targets = tmask.nonzero(as_tuple=True)
    sources = (row_of[targets[0]], col_of[targets[0], targets[1] - 1])
    segment = segment.to(device)
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(W, W, dtype=torch.bool, device=device).tril()
    mask = causal & ((q == k) | (k == 0)) & (q >= 0) & (k >= 0)
    mask = mask | torch.eye(W, dtype=torch.bool, device=device)
    packed = {"input_ids": p_ids.to(device), "attention_mask": mask[:, None], "position_ids": p_pos.to(device)}
    return SharedLayout(packed, tuple(t.to(device) for t in sources), tuple(t.to(device) for t in targets))


def shared_token_logprobs(model, batch: dict, layout: SharedLayout, chunk_size: int = 1024,
                          temperature: float = 1.0, return_entropy: bool = False):
    """`token_logprobs(model, batch, …)` computed on `layout` (one decoder pass over the packed rows)."""
    hidden, _ = forward_hidden(model, layout.packed)
    return scatter_logprobs(model, hidden, layout.sources, batch["input_ids"], layout.targets, chunk_size,
                            temperature, return_entropy)


def group_token_logprobs(model, batch: dict, chunk_size: int = 1024, temperature: float = 1.0,
                         return_entropy: bool = False, share: bool = True):
    """`token_logprobs` of online RL's rows, with each prompt encoded once when that is exact (`share` on, the
    batch carries ``prompt_index``, some prompt has two rows here, the model `shares_exactly`); else as before."""
    layout = shared_layout(batch) if share and shares_exactly(model) else None
    if layout is not None:
        return shared_token_logprobs(model, batch, layout, chunk_size, temperature, return_entropy)
    return token_logprobs(model, batch, chunk_size, temperature=temperature, return_entropy=return_entropy)

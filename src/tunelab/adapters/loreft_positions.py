"""Where LoReFT intervenes: the first `f` and last `l` tokens of each document's *prompt* (see loreft.py).

"The prompt" is the same text in training and at generation, whatever `data.masking` trains on:

* training/scoring batches carry ``prompt_mask`` [B, T] (data/collate.py): True on the tokens of each
  document's prompt span — everything the template renders before the first trained assistant response (system
  and user content, template headers, the assistant header). That is exactly what `Template.generation_prompt`
  renders for the same conversation, so a run intervenes at the positions generation will use (pyreft
  `examples/loreft/dataset.py`: positions over the prompt, last position = prompt length). Batches without the
  key (hand-built, or examples encoded without segments) fall back to the tokens before each document's first
  `loss_mask` token. A document whose prompt is empty (plain-text / continued-pretraining data) is refused:
  LoReFT has nowhere to intervene on it.
* a forward outside `batch_context` (generate, plain `model(ids)`) that starts with an empty KV cache is a
  prefill: its attended input is the prompt. A forward continuing a non-empty cache is a decoding step: its
  tokens are generated ones and are not intervened. By causality this equals re-running the whole sequence with
  only the prompt positions intervened. The cache is recognised under either keyword transformers has used for
  it (``cache`` since the 5.x rename, ``past_key_values`` before), or from a 2-D attention mask longer than
  the new input (generate passes the mask of the whole sequence so far). Chunked prefill (generate's
  `prefill_chunk_size`) is not supported: its first chunk would be taken for the whole prompt.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import TunelabError

NO_PROMPT = ("loreft: a training document has no prompt to intervene on (plain-text data, e.g. data.format=text "
             "or continued pretraining); LoReFT edits the first/last prompt tokens, so train it on instruction or "
             "chat data, or pick another method")
CACHE_KEYS = ("cache", "past_key_values")  # the body's KV-cache keyword: transformers 5.x renamed it to `cache`


def _documents(seq_ids: torch.Tensor):
    """(valid, new_doc, start, doc) [B, T]: real token, first token of a document, that document's first
    position, document index along the row (0 for leading padding)."""
    B, T = seq_ids.shape
    dev = seq_ids.device
    valid = seq_ids >= 0
    prev = torch.cat([torch.full((B, 1), -2, dtype=seq_ids.dtype, device=dev), seq_ids[:, :-1]], dim=1)
    new_doc = valid & (seq_ids != prev)
    t = torch.arange(T, device=dev).expand(B, T)
    start = torch.where(new_doc, t, torch.zeros_like(t)).cummax(dim=1).values
    doc = (new_doc.long().cumsum(dim=1) - 1).clamp(min=0)
    return valid, new_doc, start, doc


def _per_doc(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Inclusive running count of `x` [B, T] restarted at every document (`start` from `_documents`)."""
    c = x.long().cumsum(dim=1)
    return c - (c - x.long()).gather(1, start)


def prompt_before_loss(seq_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Fallback prompt mask [B, T]: each document's tokens before its first `loss_mask` token."""
    valid, _, start, _ = _documents(seq_ids)
    return valid & (_per_doc(loss_mask.to(seq_ids.device).bool() & valid, start) == 0)


def _cap(P: torch.Tensor, f: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) counts per prompt length P: as asked when f + l ≤ P, else split without overlap."""
    f_t, l_t = torch.full_like(P, f), torch.full_like(P, last)
    f1 = torch.minimum(f_t, (P + 1) // 2)
    l1 = torch.minimum(l_t, P - f1)
    f1 = torch.minimum(f_t, P - l1)  # give back what the suffix did not need
    fits = f_t + l_t <= P
    return torch.where(fits, f_t, f1), torch.where(fits, l_t, l1)


def prompt_locations(seq_ids: torch.Tensor, prompt_mask: torch.Tensor | None, first: int, last: int) -> torch.Tensor:
    """Codes [B, T] (int8): 1 on the first `first`, 2 on the last `last` prompt tokens of every document.

    `seq_ids` [B, T]: document index per token, -1 on padding. `prompt_mask` [B, T]: the prompt tokens (all real
    tokens when None). Tokens are ranked among their document's prompt tokens, so a document's P prompt tokens
    get ranks 0..P-1: prefix where rank < f, suffix where rank ≥ P - l. Vectorised: no loop over documents.
    Raises `TunelabError` (NO_PROMPT) if a document has no prompt token."""
    B, T = seq_ids.shape
    valid, new_doc, start, doc = _documents(seq_ids)
    prompt = valid if prompt_mask is None else valid & prompt_mask.to(seq_ids.device).bool()
    rank = _per_doc(prompt, start) - 1
    n_docs = int(doc.max()) + 1 if T else 1
    P = torch.zeros(B, n_docs, dtype=torch.long, device=seq_ids.device).scatter_add(1, doc, prompt.long())
    P = P.gather(1, doc)
    if bool((new_doc & (P == 0)).any()):
        raise TunelabError(NO_PROMPT)
    f, l_ = _cap(P, first, last)
    codes = torch.zeros(B, T, dtype=torch.int8, device=seq_ids.device)
    codes[prompt & (rank >= P - l_)] = 2
    codes[prompt & (rank < f)] = 1
    return codes


def _seq_ids_from(mask, shape: tuple, device) -> torch.Tensor:
    if mask is not None and mask.dim() == 2:
        return ((mask > 0).long() - 1).to(device)  # left/right padding → -1
    return torch.zeros(shape, dtype=torch.long, device=device)


def batch_codes(batch: dict, first: int, last: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, codes) for every `<prefix>input_ids` of `batch` that has a `<prefix>loss_mask` (the main
    rows, `chosen_`/`kl_`… rows): positions from `<prefix>prompt_mask`, else before the first loss token."""
    entries = []
    for key, ids in batch.items():
        if not key.endswith("input_ids") or not torch.is_tensor(ids):
            continue
        p = key[: -len("input_ids")]
        if batch.get(p + "loss_mask") is None:
            continue
        seq = batch.get(p + "seq_ids")
        if seq is None:
            seq = _seq_ids_from(batch.get(p + "attention_mask"), tuple(ids.shape), ids.device)
        prompt = batch.get(p + "prompt_mask")
        if prompt is None:
            prompt = prompt_before_loss(seq, batch[p + "loss_mask"])
        entries.append((ids, prompt_locations(seq, prompt, first, last)))
    return entries


def _cached_tokens(cache) -> int:
    """Tokens already in a KV cache: a `Cache` object, or the legacy tuple of (key, value) per layer."""
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])
    return 0


def forward_kwargs(module, args: tuple, kwargs: dict) -> dict:
    """The keyword view of a forward call (positional arguments named after `module.forward`'s signature)."""
    if not args:
        return kwargs
    names = [n for n in inspect.signature(module.forward).parameters if n not in ("args", "kwargs")]
    return {**dict(zip(names, args)), **kwargs}


def continues_cache(kwargs: dict, n_new: int) -> bool:
    """Does this forward extend a non-empty KV cache (a decoding step) rather than start one (a prefill)?"""
    for name in CACHE_KEYS:
        cache = kwargs.get(name)
        if cache is not None and _cached_tokens(cache) > 0:
            return True
    mask = kwargs.get("attention_mask")
    return torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] > n_new


def forward_codes(kwargs: dict, shape: tuple, device, first: int, last: int) -> torch.Tensor | None:
    """Codes for a forward outside `batch_context`: the prefill's attended input is the prompt; None (no
    intervention) for a decoding step."""
    if continues_cache(kwargs, shape[1]):
        return None
    return prompt_locations(_seq_ids_from(kwargs.get("attention_mask"), shape, device), None, first, last)

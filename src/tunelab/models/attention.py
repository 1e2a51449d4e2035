"""The cheapest exact form of a training batch's attention, so that SDPA can take its fused causal kernel.

A tunelab batch (`data/collate.py`) always carries an explicit attention mask, because SmolLM2's pad token is
its eos and a mask is the only thing telling them apart. Handing that mask to the model is *correct* but slow on
CPU: with any mask tensor, `scaled_dot_product_attention` takes its math path, which materialises seq² scores
per head per layer and keeps them for the backward pass (issue #13: most of a packed step's activation memory).
Two exact rewrites avoid the mask altogether:

* **Right-padded rows** (one document per row, real tokens first, positions 0..n-1): pads come after every real
  token, so under a plain causal mask no real token can see a pad. The model gets ``attention_mask=None`` and
  ``position_ids=None`` (its default positions, arange(T), equal the batch's on every real token), transformers
  then builds no mask and SDPA runs ``is_causal=True``. Pads now attend to the real tokens before them, which
  changes only the pads' own hidden states, and nothing reads those (the loss mask is False there; scoring and
  reward heads read real positions). ``position_ids=None`` matters: a row whose pads restart at position 0 would
  otherwise be detected by transformers as *packed* and get a dense block mask again.
* **Packed rows** (several documents per row, `seq_ids` ≥ 0), when they are long next to their documents
  (`SEGMENT_WORK_RATIO`; a 512-token row of 2–3 documents keeps its dense mask, which CPU SDPA's flash kernel
  handles well): the documents' spans are passed down to the
  attention function as ``tunelab_segments`` and attention runs per document with ``is_causal=True``
  (`segment_sdpa`), which is the block-diagonal causal mask without ever building it. The linear layers still
  run on the whole packed ``[B, T]`` batch, so nothing is padded. This needs the model's attention to be
  "sdpa" (the default on CPU and CUDA); any other implementation keeps the dense mask.

`register()` (run on import) wraps transformers' "sdpa" attention function: it behaves exactly as before unless
the ``tunelab_segments`` keyword is present, so generation, evaluation and every other caller are untouched.
Equivalence with the dense-mask path is tested in tests/objectives/test_fast_attention.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEGMENTS_KEY = "tunelab_segments"
# Per-document attention only when it skips most of the row's causal triangle: Σ len² ≤ this × T² per row.
# CPU SDPA's flash kernel also accepts the dense mask (torch 2.13), and one masked call beats several short
# causal ones on short rows: fwd+bwd attention, 9/3 heads × 64, CPU time, masked/segmented = 0.76 for a
# 512-token row of two documents, 2.44 for a 4,096-token row of sixteen (benchmarks/README.md).
SEGMENT_WORK_RATIO = 0.25
_ORIGINAL = {}


def segment_sdpa(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, is_causal=None,
                 **kwargs):
    """transformers' "sdpa" attention function, per document when ``tunelab_segments`` is given.

    query [B, Hq, T, D], key/value [B, Hkv, T, D]; ``tunelab_segments``: for each row, the (start, end) spans
    that tile [0, T) (documents, then the padding tail as one more span). Returns ([B, T, Hq, D], None) like
    transformers' own function."""
    segments = kwargs.pop(SEGMENTS_KEY, None)
    if segments is None or query.shape[2] != key.shape[2]:  # not a training batch (a KV-cache step, …)
        return _ORIGINAL["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    rows = []
    # split, not slicing: its backward is one cat, where each slice's backward would zero-fill a full-size
    # gradient per document (~15 % of a packed step in aten::fill_ when sliced). 4-D pieces on purpose: CPU
    # SDPA takes the math path for 3-D inputs with enable_gqa (measured), the flash kernel for 4-D ones.
    for spans, q, k, v in zip(segments, query.split(1), key.split(1), value.split(1)):
        lens = [e - s for s, e in spans]
        parts = [F.scaled_dot_product_attention(qs, ks, vs, dropout_p=p, is_causal=True, scale=scaling,
                                                enable_gqa=gqa)
                 for qs, ks, vs in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2))]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Wrap transformers' "sdpa" attention function with `segment_sdpa` (idempotent)."""
    from transformers.modeling_utils import AttentionInterface

    if "sdpa" not in _ORIGINAL:
        _ORIGINAL["sdpa"] = AttentionInterface._global_mapping["sdpa"]
        AttentionInterface.register("sdpa", segment_sdpa)


def document_spans(seq_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) spans of equal `seq_ids` runs ([B, T], documents ≥ 0, padding -1) tiling [0, T)."""
    T = seq_ids.shape[1]
    change = torch.ones_like(seq_ids, dtype=torch.bool)
    change[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    out = []
    for row in change.tolist():
        starts = [t for t, c in enumerate(row) if c]
        out.append(list(zip(starts, starts[1:] + [T])))
    return out


def _right_padded_from_zero(mask: torch.Tensor, position_ids: torch.Tensor | None) -> bool:
    """Is every row's mask 1…1 0…0, with positions 0..n-1 on its real tokens?"""
    arange = torch.arange(mask.shape[1], device=mask.device)
    real = mask.bool()
    if not torch.equal(real, arange < real.sum(-1, keepdim=True)):
        return False
    return position_ids is None or bool((position_ids == arange)[real].all())


def attention_inputs(model, batch: dict) -> dict:
    """The attention keywords for the decoder on `batch`: the fastest form that computes the same hidden states
    on every real token (see the module docstring); the batch's own mask and positions otherwise."""
    mask, pos = batch["attention_mask"], batch.get("position_ids")
    impl = getattr(model.config, "_attn_implementation", None)
    if mask.dim() == 2 and _right_padded_from_zero(mask, pos):
        return {"attention_mask": None, "position_ids": None}
    seq_ids = batch.get("seq_ids")
    if mask.dim() == 4 and seq_ids is not None and impl == "sdpa" and "sdpa" in _ORIGINAL:
        spans = document_spans(seq_ids)
        work = sum((e - s) ** 2 for row in spans for s, e in row) / (seq_ids.numel() * seq_ids.shape[1])
        if work <= SEGMENT_WORK_RATIO:
            # a 2-D all-ones mask: transformers then skips building one (is_causal), and the spans do the rest
            ones = torch.ones(seq_ids.shape, dtype=torch.long, device=seq_ids.device)
            return {"attention_mask": ones, "position_ids": pos, SEGMENTS_KEY: spans}
    return {"attention_mask": mask, "position_ids": pos}


register()

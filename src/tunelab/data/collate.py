"""Turn encoded examples (or packed rows of them) into a batch: a dict of tensors, all ``[B, T]`` except a
packed attention mask.

Keys:

``input_ids``       long ``[B, T]``, right-padded with `pad_id`.
``attention_mask``  unpacked: long ``[B, T]`` (1 = real token). Packed: bool ``[B, 1, T, T]``, True where
                    query ``i`` may attend key ``j``: same document and ``j ≤ i`` (block-diagonal causal).
                    Padding positions attend only to themselves, so no softmax row is empty (an all-masked
                    row would give NaN in SDPA, and NaN·0 is still NaN in the backward pass).
``position_ids``    long ``[B, T]``, restarting at 0 for each document (0 on padding) so a packed document sees
                    exactly the positions it would see alone — RoPE is then identical to the unpacked run.
``loss_mask``       bool ``[B, T]``: token t is a target, predicted from position t-1 (see masking.py).
                    False on padding and on every document's first token: in a packed row the previous
                    position belongs to another document, so that "prediction" would leak across documents.
``seq_ids``         long ``[B, T]``: document index within the row, -1 on padding.
``prompt_mask``     bool ``[B, T]``: the document's prompt span (`Encoded.prompt_mask`, see masking.py) — what
                    generation would be given for it, whatever the loss trains on; per document in a packed
                    row, all False for plain text. Examples without one (built by hand, eval scoring) take
                    their tokens before the first target. Read by methods that act on prompt positions (LoReFT).

With these, a packed batch gives the same per-token losses as the same examples run one by one (tested to
1e-5 in fp32 on a tiny Llama). Transformers accepts the 4D boolean mask as-is for eager/SDPA attention.
Memory of the 4D mask is B·T² bytes (8×4096² ≈ 134 MB), fine for the sequence lengths tunelab targets.
"""

from __future__ import annotations

import torch

from .masking import Encoded


def collate(items, pad_id: int, packed: bool = False, pad_to_multiple_of: int | None = None) -> dict:
    """Batch `items`: a list of `Encoded` (unpacked) or a list of rows, each a list of `Encoded` (packed).

    In packed mode a bare `Encoded` counts as a one-document row.
    """
    rows = [[it] if isinstance(it, Encoded) else list(it) for it in items]
    if not packed and any(len(r) != 1 for r in rows):
        raise ValueError("collate(packed=False) takes one example per row; use packed=True for packed rows")
    lengths = [sum(len(ex) for ex in r) for r in rows]
    T = max(lengths, default=0)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    seq_ids = torch.full((B, T), -1, dtype=torch.long)
    prompt_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, row in enumerate(rows):
        pos = 0
        for doc, ex in enumerate(row):
            n = len(ex)
            input_ids[b, pos: pos + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            loss_mask[b, pos: pos + n] = torch.tensor(ex.loss_mask, dtype=torch.bool)
            loss_mask[b, pos] = False  # a document's first token has no in-document predecessor
            position_ids[b, pos: pos + n] = torch.arange(n)
            seq_ids[b, pos: pos + n] = doc
            prompt_mask[b, pos: pos + n] = torch.tensor(_prompt_of(ex), dtype=torch.bool)
            pos += n
    if packed:
        attention_mask = block_causal_mask(seq_ids)
    else:
        attention_mask = (seq_ids >= 0).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "loss_mask": loss_mask, "seq_ids": seq_ids, "prompt_mask": prompt_mask}


def _prompt_of(ex: Encoded) -> list[bool]:
    if ex.prompt_mask is not None:
        return ex.prompt_mask
    first = next((i for i, m in enumerate(ex.loss_mask) if m and i > 0), len(ex))
    return [i < first for i in range(len(ex))]


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` bool: query i attends key j iff same document and j ≤ i; padding attends to itself."""
    T = seq_ids.shape[1]
    causal = torch.ones((T, T), dtype=torch.bool, device=seq_ids.device).tril()
    same_doc = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, :, None] >= 0)
    self_only = torch.eye(T, dtype=torch.bool, device=seq_ids.device)
    return ((same_doc & causal) | self_only)[:, None]

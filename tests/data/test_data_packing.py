"""First-fit packing, batch collation, and the key property: packed loss == unpacked loss on a real model."""

import random

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.collate import collate
from tunelab.data.formats import Sample
from tunelab.data.masking import Encoded, encode_dataset
from tunelab.data.packing import pack, packing_efficiency
from tunelab.data.templates import get_template
from tunelab.errors import TunelabError


def ex(n, tag=0, origin=""):
    """A fake example of n tokens: ids tag*100+i, every token but the first trained."""
    return Encoded([tag * 100 + i for i in range(n)], [i > 0 for i in range(n)], False, n - 1, origin)


def naive_first_fit(lengths, cap):
    rows = []
    for i, n in enumerate(lengths):
        for row in rows:
            if row[0] + n <= cap:
                row[0] += n
                row[1].append(i)
                break
        else:
            rows.append([n, [i]])
    return [r[1] for r in rows]


def test_first_fit_hand_example():
    rows = pack([ex(5, 0), ex(3, 1), ex(4, 2), ex(2, 3), ex(6, 4)], 8)
    assert [[e.input_ids[0] // 100 for e in row] for row in rows] == [[0, 1], [2, 3], [4]]
    assert packing_efficiency(rows, 8) == pytest.approx(20 / 24)


def test_first_fit_matches_the_naive_scan():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(500)]
    examples = [ex(n, i) for i, n in enumerate(lengths)]
    rows = pack(examples, 64)
    assert [[e.input_ids[0] // 100 for e in row] for row in rows] == naive_first_fit(lengths, 64)
    assert all(sum(len(e) for e in row) <= 64 for row in rows)


def test_pack_rejects_an_example_longer_than_the_row():
    with pytest.raises(TunelabError, match="d.jsonl:4: 9 tokens do not fit a packed row of 8"):
        pack([ex(3), ex(9, origin="d.jsonl:4")], 8)


def test_collate_unpacked_right_pads():
    b = collate([ex(3, 1), ex(5, 2)], pad_id=7, packed=False)
    assert b["input_ids"].tolist() == [[100, 101, 102, 7, 7], [200, 201, 202, 203, 204]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]
    assert b["seq_ids"].tolist() == [[0, 0, 0, -1, -1], [0, 0, 0, 0, 0]]
    assert b["loss_mask"].dtype == torch.bool
    assert b["loss_mask"].tolist() == [[False, True, True, False, False], [False, True, True, True, True]]
    assert collate([ex(3)], pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError):
        collate([[ex(2), ex(2)]], pad_id=0, packed=False)


def test_collate_packed_block_diagonal_mask_and_position_restart():
    first = Encoded([1, 2, 3], [True, True, True], False, 3)  # even a stray True at a doc start is cleared
    b = collate([[first, ex(2, 5)], [ex(4, 6)]], pad_id=0, packed=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 500, 501], [600, 601, 602, 603, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert b["seq_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert b["loss_mask"].tolist() == [[False, True, True, False, True], [False, True, True, True, False]]
    m = b["attention_mask"]
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0],
                                      [1, 1, 1, 0, 0],
                                      [0, 0, 0, 1, 0],
                                      [0, 0, 0, 1, 1]]
    assert m[1, 0, 4].int().tolist() == [0, 0, 0, 0, 1]  # padding attends only to itself: no empty softmax row


def per_token_losses(model, batch):
    """Plain cross-entropy per target token, in order: position t-1 predicts token t where loss_mask[t]."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    targets = batch["loss_mask"][:, 1:]
    return F.cross_entropy(logits[:, :-1][targets], batch["input_ids"][:, 1:][targets], reduction="none")


def test_packed_loss_equals_unpacked_loss_on_tiny_llama(tokenizer, tiny):
    model = tiny("llama").eval()
    samples = [Sample([{"role": "user", "content": q}, {"role": "assistant", "content": a}], None, f"d:{i}")
               for i, (q, a) in enumerate([("What is 2+2?", "4"), ("Name a colour.", "Blue, like the sky."),
                                           ("Hi", "Hello! How can I help?"), ("Count to three.", "1, 2, 3")])]
    samples.append(Sample(None, "Plain pretraining text goes here.", "d:4"))
    examples, _ = encode_dataset(tokenizer, samples, get_template("chatml", tokenizer), mode="none")
    rows = pack(examples, max(len(e) for e in examples) + 30)
    assert len(rows) < len(examples)  # several documents really share rows
    packed = collate(rows, tokenizer.pad_token_id, packed=True)
    assert packed["attention_mask"].dim() == 4
    unpacked = collate(examples, tokenizer.pad_token_id, packed=False)
    # Row order differs after packing; compare per-example loss vectors.
    order = [ex for row in rows for ex in row]
    got, start = {}, 0
    flat = per_token_losses(model, packed)
    for e in order:
        got[e.origin] = flat[start: start + e.n_trained]
        start += e.n_trained
    assert start == len(flat) == sum(e.n_trained for e in examples)
    flat, start = per_token_losses(model, unpacked), 0
    for e in examples:
        torch.testing.assert_close(got[e.origin], flat[start: start + e.n_trained], atol=1e-5, rtol=1e-5)
        start += e.n_trained

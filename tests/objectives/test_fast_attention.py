"""The mask-free attention forms (`models.attention`) compute what the batch's dense mask computes, and the
model really runs SDPA without a mask (its fused causal kernel) on them."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.collate import collate
from tunelab.data.masking import Encoded
from tunelab.models import attention
from tunelab.models.tiny import tiny_model
from tunelab.objectives.logprobs import decoder, forward_hidden, token_logprobs


def ex(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n,), generator=g).tolist()
    return Encoded(ids, [i > n // 3 for i in range(n)], False, n - n // 3 - 1, "")


EXAMPLES = [ex(n, i) for i, n in enumerate([7, 13, 5, 11, 3, 9])]


def dense_hidden(model, batch):
    return decoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"], use_cache=False).last_hidden_state


@pytest.fixture(autouse=True)
def always_segment(monkeypatch):
    """These rows are short; make the per-document form apply whatever their length (tested separately)."""
    monkeypatch.setattr(attention, "SEGMENT_WORK_RATIO", 1.0)


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask, kw.get("is_causal", False)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("packed", [False, True])
def test_fast_form_matches_the_dense_mask(arch, packed, sdpa_calls):
    model = tiny_model(arch)
    assert model.config._attn_implementation == "sdpa"
    items = [EXAMPLES[:3], EXAMPLES[3:5], EXAMPLES[5:]] if packed else EXAMPLES
    batch = collate(items, pad_id=0, packed=packed)
    real = batch["seq_ids"] >= 0
    ref = dense_hidden(model, batch)
    sdpa_calls.clear()
    fast, _ = forward_hidden(model, batch)
    assert sdpa_calls and all(mask is None and causal for mask, causal in sdpa_calls)  # the fused causal kernel
    torch.testing.assert_close(fast[real], ref[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_fast_form_gives_the_same_loss_and_gradients(packed, monkeypatch):
    model = tiny_model("llama")
    items = [EXAMPLES[:3], EXAMPLES[3:]] if packed else EXAMPLES
    batch = collate(items, pad_id=0, packed=packed)

    def grads():
        model.zero_grad()
        loss = -token_logprobs(model, batch).sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fast_loss, fast_grads = grads()
    monkeypatch.setattr("tunelab.objectives.logprobs.attention_inputs",
                        lambda m, b: {"attention_mask": b["attention_mask"], "position_ids": b["position_ids"]})
    ref_loss, ref_grads = grads()
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_spans_and_when_each_form_applies(monkeypatch):
    seq = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    assert attention.document_spans(seq) == [[(0, 2), (2, 5), (5, 6)], [(0, 6)]]
    model = tiny_model("llama")
    padded = collate(EXAMPLES[:2], pad_id=0)
    assert attention.attention_inputs(model, padded) == {"attention_mask": None, "position_ids": None}
    left = dict(padded, attention_mask=padded["attention_mask"].flip(-1))  # left padding keeps its mask
    assert attention.attention_inputs(model, left)["attention_mask"] is left["attention_mask"]
    packed = collate([EXAMPLES[:2]], pad_id=0, packed=True)
    assert attention.attention_inputs(model, packed)[attention.SEGMENTS_KEY] == [[(0, 7), (7, 20)]]
    long_row = torch.arange(64).div(8, rounding_mode="floor")[None]  # 8 documents: 1/8 of the causal work
    assert attention.attention_inputs(model, dict(packed, seq_ids=long_row))[attention.SEGMENTS_KEY]
    monkeypatch.setattr(attention, "SEGMENT_WORK_RATIO", 0.25)  # the default: 2 documents of 7 and 13 tokens
    assert attention.attention_inputs(model, packed)["attention_mask"] is packed["attention_mask"]
    assert attention.attention_inputs(model, dict(packed, seq_ids=long_row))[attention.SEGMENTS_KEY]
    model.set_attn_implementation("eager")  # no per-document kernel: the dense mask stays
    assert attention.attention_inputs(model, packed)["attention_mask"] is packed["attention_mask"]

"""`rl.sampler` without vLLM installed (the main venv): names checked with one line, the vLLM sampler refused with
one line naming what is missing, the policies it cannot push named, and the mismatch metrics hand-checked.
The vLLM sampler itself runs in tests/test_vllm_sampler.py (`make test-vllm`)."""

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.rl.rollout_engine import build_sampler, mismatch_metrics
from tunelab.rl.sampler import SamplingParams, TorchSampler
from tunelab.sampling import sample


def _cfg(name, top_p=1.0):
    return SimpleNamespace(rl=SimpleNamespace(sampler=name, max_new_tokens=8, top_p=top_p),
                           data=SimpleNamespace(max_length=32))


def test_unknown_sampler_is_one_line(tiny, tokenizer):
    ctx = SimpleNamespace(model=tiny("llama"), tokenizer=tokenizer)
    with pytest.raises(TunelabError, match=r"^rl.sampler: unknown sampler 'vlm' \(choose from torch, vllm\)$"):
        build_sampler(_cfg("vlm"), ctx, 4)


def test_vllm_sampler_refuses_top_p_below_one(tiny, tokenizer):
    ctx = SimpleNamespace(model=tiny("llama"), tokenizer=tokenizer)
    with pytest.raises(TunelabError, match=r"^rl.top_p=0.9: rl.sampler vllm returns log-probs of the nucleus-"):
        build_sampler(_cfg("vllm", top_p=0.9), ctx, 4)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_sampler_without_vllm_is_one_line(tiny, tokenizer):
    ctx = SimpleNamespace(model=tiny("llama"), tokenizer=tokenizer)
    with pytest.raises(TunelabError, match=r"^rl.sampler: vllm needs vLLM in this environment \(make test-vllm"):
        build_sampler(_cfg("vllm"), ctx, 4)


@pytest.mark.parametrize("method,kind", [("lora", "lora"), ("full", "full"), ("dora", None), ("loreft", None)])
def test_policy_kind(tiny, method, kind):
    from tunelab.adapters.base import get_method
    from tunelab.rl.vllm_sampler import policy_kind

    model = tiny("llama")
    get_method(method).wrap(model, None)
    if kind:
        assert policy_kind(model) == kind
    else:
        with pytest.raises(TunelabError, match=r"^rl.sampler: vllm pushes LoRA/rsLoRA adapters or whole models; this"
                                               r" policy has \w+ .*use rl.sampler: torch$"):
            policy_kind(model)


def test_torch_sampler_is_sampling_sample(tiny, tokenizer):
    model = tiny("llama")
    prompts = [[1, 2, 3], [4, 5]]
    got = TorchSampler(model, tokenizer, 4).sample(prompts, SamplingParams(n=2, temperature=0.7, max_new_tokens=5,
                                                                            seed=3))
    want = sample(model, tokenizer, prompts, n=2, temperature=0.7, max_new_tokens=5, seed=3, batch_size=4)
    assert got.completions() == want.completions() and torch.equal(got.logprobs, want.logprobs)


def test_mismatch_metrics_by_hand(tiny, tokenizer):
    """old = the trainer's own log-probs → 0; one of n tokens' old log-prob raised by δ → KL = (e^−δ − 1 + δ)/n."""
    from tunelab.objectives.logprobs import token_logprobs

    model = tiny("llama").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    attn = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    loss = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    rows = {"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "loss_mask": loss}
    with torch.no_grad():
        rows["old_logprobs"] = token_logprobs(model, rows, temperature=0.7).float()
    m = mismatch_metrics(model, rows, 0.7, micro=1)
    assert m["mismatch_kl"] == pytest.approx(0, abs=1e-7) and m["mismatch_max_abs_logp"] < 1e-5
    delta = 0.3
    rows["old_logprobs"][0, 3] += delta
    m = mismatch_metrics(model, rows, 0.7, micro=2)
    assert m["mismatch_kl"] == pytest.approx((math.exp(-delta) - 1 + delta) / 6, abs=1e-6)
    assert m["mismatch_max_abs_logp"] == pytest.approx(delta, abs=1e-5)

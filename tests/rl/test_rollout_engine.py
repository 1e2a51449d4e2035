"""`rl.sampler` without vLLM installed (the main venv): names checked with one line, the vLLM sampler refused with
one line naming what is missing (or a top_p whose log-probs would not be π_old), the policies it cannot push
named. The vLLM sampler itself runs in tests/test_vllm_sampler.py (`make test-vllm`); the train–inference
mismatch every online run logs is tested in tests/rl/test_issue24_runs.py."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.rl.sampler import SamplingParams, TorchSampler, build_sampler, check_sampler
from tunelab.sampling import sample


def _rl(name, top_p=1.0):
    return SimpleNamespace(sampler=name, max_new_tokens=8, top_p=top_p)


def test_unknown_sampler_is_one_line(tiny, tokenizer):
    with pytest.raises(TunelabError, match=r"^rl.sampler='vlm': unknown sampler; choose torch, vllm$"):
        check_sampler(_rl("vlm"))
    with pytest.raises(TunelabError, match=r"^rl.sampler='vlm': unknown sampler"):
        build_sampler("vlm", tiny("llama"), tokenizer, 4)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")
def test_vllm_sampler_refuses_top_p_below_one():
    with pytest.raises(TunelabError, match=r"^rl.top_p=0.9: rl.sampler vllm returns log-probs of the nucleus-"):
        check_sampler(_rl("vllm", top_p=0.9))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_sampler_without_vllm_is_one_line():
    with pytest.raises(TunelabError, match=r"^rl.sampler: vllm needs vLLM in this environment \(make test-vllm"):
        check_sampler(_rl("vllm"))


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

"""The sampler seam: how online RL gets completions of its prompts, whatever engine generates them.

`rl/rollout.py` talks only to a `Sampler`: tokenised prompts (chat template already applied) and
`SamplingParams` in, `sampling.Samples` out. At every rollout-round boundary the source calls
``load_weights(model)`` with the current policy, so an engine that holds its own copy of the weights (vLLM)
samples from the policy being trained; `TorchSampler` samples from the model object itself, so for it that is
just keeping a reference. ``rl.sampler`` names the implementation (`SAMPLERS`); ``vllm`` is imported lazily from
`rl/vllm_sampler.py` only when asked for, since vLLM lives in its own environment.

Log-prob contract (what every sampler must return, because the policy-gradient ratio divides by it):

    Samples.logprobs[b, t] = log softmax(logits / temperature)[token]   of each sampled token y_t,

the full distribution at the sampling temperature, *before* top-p truncation (temperature 1 when greedy), 0 where
``completion_mask`` is 0. This is π_old(y_t) of the ratio ρ_t = π_θ(y_t) / π_old(y_t): the trainer scores the
same tokens with `logprobs.token_logprobs(..., temperature)`, so on the sampling policy ρ = 1 up to the engines'
numerical differences (the train–inference mismatch).
The truncated distribution is not used: top-p gives probability 0 to tokens the policy can still produce when it
is re-scored, which would make ratios infinite. ``finish_reason`` is "stop" (eos, a stop token, a stop string) or
"length"; tensors come back on the CPU or the policy's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from ..errors import TunelabError
from ..sampling import Samples, sample


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1                      # completions per prompt (adjacent rows in Samples)
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None


class Sampler(Protocol):
    """Prompts (token ids, template already applied) + params -> `sampling.Samples`.

    Log-prob contract: `Samples.logprobs[b, t]` = log softmax(logits / temperature)[token] of each sampled token,
    before top-p truncation (temperature 1 for greedy), 0 where completion_mask is 0 — the π_old of the
    policy-gradient ratio. `finish_reason` "stop" | "length". Tensors returned on CPU or the policy's device.
    """

    name: str

    def load_weights(self, model) -> None: ...   # called at every rollout-round boundary with the current policy

    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> Samples: ...


class TorchSampler:
    """`sampling.sample` on the policy itself (batched, KV cache, deterministic under a seed)."""

    name = "torch"

    def __init__(self, model, tokenizer, batch_size: int = 16, max_model_len: int | None = None):
        # max_model_len: the longest prompt + completion of a round — an engine sizes its KV cache by it; the
        # torch sampler allocates per batch and needs no bound
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def load_weights(self, model) -> None:
        self.model = model  # the same object: nothing to copy

    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> Samples:
        return sample(self.model, self.tokenizer, prompt_ids, n=params.n, temperature=params.temperature,
                      top_p=params.top_p, max_new_tokens=params.max_new_tokens,
                      stop_token_ids=list(params.stop_token_ids), stop_strings=list(params.stop_strings),
                      seed=params.seed, batch_size=max(self.batch_size, params.n))


SAMPLERS: dict[str, type] = {"torch": TorchSampler}


def sampler_class(name: str) -> type:
    """The class ``rl.sampler`` names; ``vllm`` is imported on first use. One-line error for an unknown name."""
    if name == "vllm" and "vllm" not in SAMPLERS:
        try:
            from . import vllm_sampler  # registers "vllm" itself, or defines VLLMSampler
        except ImportError as e:
            raise TunelabError(f"rl.sampler=vllm: the vLLM sampler is not available here ({e})") from None
        if "vllm" not in SAMPLERS and hasattr(vllm_sampler, "VLLMSampler"):
            SAMPLERS["vllm"] = vllm_sampler.VLLMSampler
    if name not in SAMPLERS:
        known = sorted({*SAMPLERS, "vllm"})  # vllm is always a name, imported only when asked for
        raise TunelabError(f"rl.sampler={name!r}: unknown sampler; choose {', '.join(known)}")
    return SAMPLERS[name]


def check_sampler(rl) -> None:
    """Refuse, before anything loads, ``rl:`` settings the named sampler cannot honour (one line): the class's
    optional ``check_settings(rl)`` (e.g. vLLM's log-probs are not π_old when top_p < 1)."""
    cls = sampler_class(rl.sampler)
    getattr(cls, "check_settings", lambda _: None)(rl)


def build_sampler(name: str, model, tokenizer, batch_size: int, max_model_len: int | None = None) -> Sampler:
    return sampler_class(name)(model, tokenizer, batch_size, max_model_len=max_model_len)

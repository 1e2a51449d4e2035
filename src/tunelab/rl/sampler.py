"""The sampler seam: the one interface between `rl/rollout.py` and whatever generates the rollouts.

`TorchSampler` wraps tunelab's own `sampling.sample` (the policy itself, KV cache, stopped rows leave the batch);
`rl/vllm_sampler.py` registers "vllm" (vLLM in the same process, the policy's weights pushed each round). The
rollout source picks one by `rl.sampler`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

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
    """`sampling.sample` on the policy itself: `load_weights` only keeps the model it is given."""

    name = "torch"

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def load_weights(self, model) -> None:
        self.model = model

    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> Samples:
        return sample(self.model, self.tokenizer, prompt_ids, n=params.n, temperature=params.temperature,
                      top_p=params.top_p, max_new_tokens=params.max_new_tokens,
                      stop_token_ids=list(params.stop_token_ids), stop_strings=list(params.stop_strings),
                      seed=params.seed, batch_size=self.batch_size)


SAMPLERS = {"torch": TorchSampler}

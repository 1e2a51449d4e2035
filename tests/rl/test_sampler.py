"""The sampler seam (rl/sampler.py) and the named random streams (rl/seeds.py).

The rollout source talks only to a `Sampler` chosen by ``rl.sampler``: a sampler registered under a new name is
what a run samples with, rollouts and held-out measures alike, and it is handed the current policy at every round.
"""

import json

import pytest
import torch

from tests.rl.test_rl_runs import G, P, _cli, _train_rows, config, toy  # noqa: F401
from tunelab.config import load_config
from tunelab.rl.sampler import SAMPLERS, SamplingParams, TorchSampler
from tunelab.rl.seeds import PURPOSES, seed_of, seeded
from tunelab.sampling import sample
from tunelab.train.launch import train


def test_torch_sampler_is_sampling_sample(tiny, tokenizer):
    model = tiny("llama")
    prompts = [[1, 2, 3], [4, 5]]
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=5, stop_token_ids=(7,), seed=11)
    got = TorchSampler(model, tokenizer, batch_size=4).sample(prompts, params)
    want = sample(model, tokenizer, prompts, n=3, temperature=0.7, top_p=0.9, max_new_tokens=5, stop_token_ids=[7],
                  seed=11, batch_size=4)
    assert torch.equal(got.completion_ids, want.completion_ids) and torch.equal(got.logprobs, want.logprobs)
    assert got.finish_reason == want.finish_reason


class Recording(TorchSampler):
    """The torch sampler, recording what the rollout source asks of it."""

    name = "recording"
    calls: list = []

    def load_weights(self, model) -> None:
        Recording.calls.append(("load_weights", model is not None))
        super().load_weights(model)

    def sample(self, prompt_ids, params):
        Recording.calls.append(("sample", len(prompt_ids), params))
        return super().sample(prompt_ids, params)


def test_a_run_samples_only_through_the_named_sampler(config, monkeypatch):
    monkeypatch.setitem(SAMPLERS, "recording", Recording)
    monkeypatch.setattr(Recording, "calls", [])
    monkeypatch.setattr("tunelab.rl.rollout.sample", None, raising=False)  # no path around the seam
    out = train(load_config(config("grpo", train={"max_steps": 2}, rl={"sampler": "recording"})))
    samples = [c for c in Recording.calls if c[0] == "sample"]
    rollouts = [c for c in samples if c[2].n == G]
    measures = [c for c in samples if c[2].n == 1]
    assert len(rollouts) == 2 and len(measures) == 3  # two rounds; held-out reward before, at the last eval, after
    assert all(c[1] == P and c[2].temperature == 0.05 and c[2].max_new_tokens == 12 for c in rollouts)
    assert len({c[2].seed for c in rollouts}) == 2  # a seed per round
    assert all(c[2].temperature == 0.0 for c in measures)
    # the policy is pushed to the sampler before every round's sampling and every measure
    kinds = [c[0] for c in Recording.calls]
    assert all(kinds[i - 1] == "load_weights" for i, k in enumerate(kinds) if k == "sample")
    assert len(_train_rows(out)) == 2


def test_an_unknown_sampler_is_one_line_before_anything_is_written(config, capsys, tmp_path):
    rc, err = _cli(capsys, config("grpo", rl={"sampler": "nope"}))
    assert rc == 2 and err == ["error: rl.sampler='nope': unknown sampler; choose torch, vllm"], err
    assert not (tmp_path / "run").exists()


def test_named_streams_are_stable_and_distinct():
    # stable across processes and versions: a change here changes every run's samples
    assert seed_of("rollout", 0, 1, 0) == 5697936967506592214
    assert seed_of("prompt_order", 0, 0) == 7690327107923101456
    seeds = {seed_of(p, 3, 1) for p in PURPOSES}
    assert len(seeds) == len(PURPOSES)  # no two purposes share a stream
    assert seed_of("rollout", 1, 23) != seed_of("rollout", 12, 3)  # keys are separated, not concatenated
    a, b = seeded("minibatch", 0, 2, 1), seeded("minibatch", 0, 2, 1)
    assert torch.equal(torch.randperm(10, generator=a), torch.randperm(10, generator=b))
    with pytest.raises(ValueError, match="unknown random stream 'shuffle'"):
        seeded("shuffle", 1)

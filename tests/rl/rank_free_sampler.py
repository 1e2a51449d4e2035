"""A test sampler whose completions of a prompt depend on the prompt alone — not on the rank, the round's seed or
which other prompts share the batch — so a data-parallel run samples exactly what one process samples, and
N ranks × b rows can be compared with one process × N·b rows end to end (tests/train/test_distributed_ppo.py)."""

import hashlib

import torch

from tunelab.rl.sampler import SamplingParams, TorchSampler
from tunelab.sampling import Samples


class RankFreeSampler(TorchSampler):
    name = "rank_free"

    def sample(self, prompt_ids, params: SamplingParams) -> Samples:
        parts = []
        for ids in prompt_ids:
            seed = int.from_bytes(hashlib.blake2b(str(list(ids)).encode(), digest_size=4).digest(), "little")
            parts.append(super().sample([ids], SamplingParams(**{**params.__dict__, "seed": seed})))
        return _concat(parts, self.tokenizer.pad_token_id)


def _concat(parts: list[Samples], pad_id: int) -> Samples:
    def cat(name, left, fill):
        width = max(getattr(p, name).shape[1] for p in parts)
        out = []
        for p in parts:
            t = getattr(p, name)
            pad = torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype, device=t.device)
            out.append(torch.cat([pad, t] if left else [t, pad], dim=1))
        return torch.cat(out)

    index = torch.cat([p.prompt_index + k for k, p in enumerate(parts)])
    return Samples(cat("prompt_ids", True, pad_id), cat("prompt_mask", True, 0), cat("completion_ids", False, pad_id),
                   cat("completion_mask", False, 0), cat("logprobs", False, 0.0),
                   tuple(f for p in parts for f in p.finish_reason), index)


def even_share(batch):
    """A reward that varies between completions: the share of even token ids."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in batch.completion_ids]

"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO", arXiv:2503.14476, §3.2): a round trains only on
prompt groups whose completions do not all get the same reward.

A group whose G rewards are all equal (always solved, never solved) has advantage 0 under every group-relative
estimator: it adds no policy gradient, yet its tokens still count in the loss normaliser and its KL term still
pulls — so as accuracy rises, the effective batch shrinks. Dynamic sampling drops those groups and samples more
prompts until the round holds `rl.prompts_per_step` informative groups:

    # step 1. the round's regular sample: P prompts × G completions, scored
    # step 2. while fewer than P groups are informative and fewer than `dynamic_sampling_max_rounds` extra
    #         passes ran: sample P more prompts × G (other prompts, a seed of their own), score, append
    # step 3. keep the first P informative groups in sampling order; if the cap stopped step 2 short, fill the
    #         round with uninformative groups (advantage 0) so it keeps its size — counted in the metrics

Pure parts here (`informative_groups`, `choose_groups`, `concat_samples`, `select_groups`); the sampling loop is
`RolloutSource._dynamic_sampling` (rl/rollout.py). verl's DAPO recipe (``algorithm.filter_groups``) does steps
2–3 with ``max_num_gen_batches`` as its cap.
"""

from __future__ import annotations

import torch

from ..sampling import Samples


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[K] bool: group k (rows [k·G, (k+1)·G)) has at least two different rewards."""
    r = torch.as_tensor(rewards).reshape(-1, group_size)
    return r.max(-1).values != r.min(-1).values


def choose_groups(informative: torch.Tensor, n: int) -> list[int]:
    """The `n` groups a round keeps, in sampling order: the informative ones first; when there are fewer than `n`,
    the earliest uninformative ones fill the rest."""
    keep = informative.nonzero().flatten().tolist()[:n]
    if len(keep) < n:
        keep += (~informative).nonzero().flatten().tolist()[:n - len(keep)]
    return sorted(keep)


def _pad_to(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)


def concat_samples(a: Samples, b: Samples, pad_id: int) -> Samples:
    """`a`'s rows then `b`'s (prompts re-left-padded, completions re-right-padded; b's prompt_index shifted)."""
    P = max(a.prompt_ids.shape[1], b.prompt_ids.shape[1])
    T = max(a.completion_ids.shape[1], b.completion_ids.shape[1])
    shift = int(a.prompt_index.max()) + 1 if a.prompt_index.numel() else 0
    cat = lambda x, y, w, v, left: torch.cat([_pad_to(x, w, v, left), _pad_to(y, w, v, left)])  # noqa: E731
    return Samples(cat(a.prompt_ids, b.prompt_ids, P, pad_id, True), cat(a.prompt_mask, b.prompt_mask, P, 0, True),
                   cat(a.completion_ids, b.completion_ids, T, pad_id, False),
                   cat(a.completion_mask, b.completion_mask, T, 0, False), cat(a.logprobs, b.logprobs, T, 0.0, False),
                   a.finish_reason + b.finish_reason, torch.cat([a.prompt_index, b.prompt_index + shift]))


def select_groups(samples: Samples, groups: list[int], group_size: int) -> Samples:
    """The rows of `groups` (each G adjacent rows), renumbered 0..len(groups)−1."""
    rows = torch.tensor([g * group_size + j for g in groups for j in range(group_size)], dtype=torch.long)
    dev = samples.prompt_ids.device
    idx = rows.to(dev)
    return Samples(samples.prompt_ids[idx], samples.prompt_mask[idx], samples.completion_ids[idx],
                   samples.completion_mask[idx], samples.logprobs[idx],
                   tuple(samples.finish_reason[i] for i in rows.tolist()),
                   torch.arange(len(groups), device=dev).repeat_interleave(group_size))

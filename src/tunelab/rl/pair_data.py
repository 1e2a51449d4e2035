"""Training data from scored samples: preference pairs and rejection-sampled SFT rows (a pipeline's data stage).

For each prompt x, G = ``rl.group_size`` completions y_1..y_G are sampled from a policy and scored by the run's
reward functions (rl/rewards.py: a verifier such as ``exact_match``, or a trained ``reward_model``),
s_i = Σ_k w_k · r_k(x, y_i). From each group:

    pair   chosen = y_a, rejected = y_b with a = argmax_i s_i, b = argmin_i s_i (the first such index on ties).
           A group with s_a − s_b ≤ ``pair_margin`` is skipped and counted (``tied_groups``): it states no
           preference — a zero-gradient pair for DPO, a coin flip for a reward model; so is a group whose best
           and worst texts are identical (``identical_groups``). Two different samples, always.
    sft    rejection sampling as data (best-of-K: Llama 2 §3.2.3, Llama 3 §4.2.2; RAFT, Dong et al. 2023):
           ``sft_keep: best`` keeps y_a if s_a ≥ ``sft_threshold``; ``all`` keeps every y_i with s_i ≥ the
           threshold. Threshold null: no threshold — the best of K whatever its score, what Llama 3 does with a
           reward model; with a verifier set it to 1.0, so that only correct answers are kept.

Every row records its scores, where its prompt came from (``origin``) and the model it was sampled from
(``source_policy``; ``source_stage`` names the pipeline stage), so a later stage's data traces back to the policy
that produced it. The prompt is written as a string for a single user turn, else as chat messages; both are
formats the pair (data/preference.py) and SFT (data/formats.py) readers take. No ``margin`` field is written:
the reward model would read it as a margin for its loss. ``include_pairs`` copies the rows of earlier pair files
(e.g. an earlier round's, ``${STAGE:r1_rm_pairs}/pairs.jsonl``) in front of the new ones: a reward model then
trains on all the preference data so far, as Llama 3's does (§4.1.2).

`sample_completions` is the one call into the sampler, so that switching samplers is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from ..config import Strict
from ..data.formats import prompt_of
from ..data.sources import Record
from ..generate import cut_at_stop
from ..sampling import Samples
from .rewards import RewardInputs
from .sampler import SamplingParams, TorchSampler

DATA_FILES = {"pairs": "pairs.jsonl", "sft": "sft.jsonl"}  # what a data stage writes, by `generate` switch


class GenerateOptions(Strict):
    """A data stage's ``generate:`` section (how many samples, the sampler and the scorer are its ``rl:``)."""

    pairs: bool = True  # write pairs.jsonl: per prompt, a highest- vs a lowest-scored sample
    include_pairs: list[str] = []  # earlier pair files whose rows pairs.jsonl starts with (data accumulated)
    pair_margin: float = Field(0.0, ge=0.0)  # skip a group whose best − worst score is ≤ this
    sft: bool = False  # write sft.jsonl: the samples that pass sft_threshold
    sft_keep: Literal["best", "all"] = "best"  # the best passing sample of each prompt, or every passing one
    sft_threshold: float | None = None  # a sample is kept when its score ≥ this; null: no threshold

    def files(self) -> list[str]:
        """The files this stage writes (``pairs.jsonl``, ``sft.jsonl``)."""
        return [DATA_FILES[k] for k in DATA_FILES if getattr(self, k)]


@dataclass
class GroupTally:
    """What selection did with the groups so far (written to the stage's data.json)."""

    prompts: int = 0
    samples: int = 0
    pairs: int = 0
    tied_groups: int = 0
    identical_groups: int = 0
    sft_kept: int = 0
    score_sum: float = 0.0
    truncated: int = 0
    reward_sums: dict = field(default_factory=dict)  # per reward function: Σ of its scores

    def add(self, chunk: "ScoredChunk") -> None:
        """Count a chunk's prompts, samples and scores."""
        self.prompts += len(chunk.scores)
        self.samples += sum(len(g) for g in chunk.scores)
        self.score_sum += sum(sum(g) for g in chunk.scores)
        self.truncated += chunk.truncated
        for k, v in chunk.per_function.items():
            self.reward_sums[k] = self.reward_sums.get(k, 0.0) + sum(v)

    def as_dict(self) -> dict:
        n = max(self.samples, 1)
        return {"prompts": self.prompts, "samples": self.samples, "pairs": self.pairs,
                "tied_groups": self.tied_groups, "identical_groups": self.identical_groups,
                "sft_kept": self.sft_kept, "score_mean": self.score_sum / n, "truncated": self.truncated,
                **{f"reward_{k}": v / n for k, v in self.reward_sums.items()}}


def select_pair(scores: list[float], texts: list[str], margin: float = 0.0) -> tuple[int, int] | str:
    """(chosen, rejected) indices of one group — the first highest and the first lowest score — or why there is
    no pair: ``"tied"`` (best − worst ≤ margin) or ``"identical"`` (the two texts are the same)."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] - scores[worst] <= margin:
        return "tied"
    if texts[best] == texts[worst]:
        return "identical"
    return best, worst


def select_sft(scores: list[float], keep: str, threshold: float | None) -> list[int]:
    """Indices of one group's samples kept as SFT rows (see the module docstring)."""
    passing = [i for i, s in enumerate(scores) if threshold is None or s >= threshold]
    if keep == "all":
        return passing
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return [best] if best in passing else []


def sample_completions(model, tokenizer, prompt_ids: list[list[int]], rl, *, stop_ids: list[int],
                       stop_strings: list[str], seed: int, batch_size: int) -> Samples:
    """`rl.group_size` completions of each prompt with the ``rl:`` sampling settings through the sampler seam
    (rl/sampler.py) — the one sampler call. A data stage samples with the torch sampler: it is called per chunk
    of prompts, and an engine such as vLLM would be built anew for each."""
    return TorchSampler(model, tokenizer, batch_size).sample(prompt_ids, SamplingParams(
        n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p, max_new_tokens=rl.max_new_tokens,
        stop_token_ids=tuple(stop_ids), stop_strings=tuple(stop_strings), seed=seed))


def stop_tokens(tokenizer, template, extra: list[str]) -> tuple[list[int], list[str]]:
    """(stop token ids, stop strings): the template's end of turn and ``rl.stop``; a stop string that is one token
    of the vocabulary also stops as an id (as the rollouts of online RL do)."""
    strings = [s for s in [*template.stop_strings, *extra] if s]
    ids = [i for s in strings if (i := tokenizer.convert_tokens_to_ids(s)) is not None
           and i != tokenizer.unk_token_id and len(tokenizer(s, add_special_tokens=False)["input_ids"]) == 1]
    return ids, strings


def _prompt_field(messages: list[dict]):
    return messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages


@dataclass
class ScoredChunk:
    """One chunk of prompts sampled and scored: per prompt, its G texts and total scores."""

    texts: list[list[str]]  # [P][G] completions, cut at the stop strings
    scores: list[list[float]]  # [P][G] Σ_k w_k · r_k
    per_function: dict[str, list[float]]  # each reward function's unweighted scores, flat [P·G]
    truncated: int  # completions that ran out of rl.max_new_tokens


def score_chunk(model, tokenizer, prompts: list, rewards, rl, *, stop_ids, stop_strings, seed: int,
                batch_size: int) -> ScoredChunk:
    """Sample G completions of each `PromptExample` in `prompts` and score them with `rewards`."""
    samples = sample_completions(model, tokenizer, [p.prompt_ids for p in prompts], rl, stop_ids=stop_ids,
                                 stop_strings=stop_strings, seed=seed, batch_size=batch_size)
    texts = [cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop_strings)
             for ids in samples.completions()]
    scored = rewards(RewardInputs.from_samples(samples, texts, [Record(p.record, p.origin) for p in prompts],
                                                 tokenizer=tokenizer))
    G = rl.group_size
    return ScoredChunk([texts[g * G:(g + 1) * G] for g in range(len(prompts))],
                       [scored.total[g * G:(g + 1) * G] for g in range(len(prompts))], scored.per_function,
                       sum(f == "length" for f in samples.finish_reason))


def group_rows(prompt, texts: list[str], scores: list[float], opts: GenerateOptions, source: dict,
               tally: GroupTally) -> tuple[dict | None, list[dict]]:
    """The pair row (or None) and the SFT rows of one prompt's group; counts what happened in `tally`."""
    messages = prompt_of(Record(prompt.record, prompt.origin))
    head = {"prompt": _prompt_field(messages)}
    tail = {"scores": list(scores), "origin": prompt.origin, **source}
    pair = None
    if opts.pairs:
        picked = select_pair(scores, texts, opts.pair_margin)
        if picked == "tied":
            tally.tied_groups += 1
        elif picked == "identical":
            tally.identical_groups += 1
        else:
            a, b = picked
            pair = {**head, "chosen": texts[a], "rejected": texts[b], "chosen_score": scores[a],
                    "rejected_score": scores[b], **tail}
            tally.pairs += 1
    sft = []
    if opts.sft:
        for i in select_sft(scores, opts.sft_keep, opts.sft_threshold):
            sft.append({**head, "completion": texts[i], "score": scores[i], **tail})
        tally.sft_kept += len(sft)
    return pair, sft

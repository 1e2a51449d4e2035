"""Rewards for online RL: small named functions over a batch of rollouts, weighted and summed.

A reward function maps a `RewardInputs` batch of B completions to B floats. The built-in ones reuse the
evaluation scorers, so a run optimises exactly what its learning report measures: ``exact_match`` is
`eval.exact.is_correct`, ``code_tests`` runs `eval.code.build_program` in `eval.sandbox`, ``reward_model``
is `objectives.reward.RewardModel` (rl/model_reward.py). The config lists them under ``rl.rewards``::

    rl:
      rewards:
        - {name: exact_match, weight: 1.0}                 # options of the function go beside name/weight
        - {name: format, weight: 0.1, pattern: '####\\s*-?\\d'}
        - {name: my_rewards:brevity, weight: 0.5}          # your own: "module:function"

================  ==========================================  =================================================
name              options (``*`` required)                    score per completion
================  ==========================================  =================================================
exact_match       extract=gsm8k | last_number | regex | none  1.0 if the extracted answer equals the record's
                  answer_field=answer, regex, ignore_case     gold answer (eval/exact.py's extractors and
                                                              normalisation: ``$1,000`` = ``1000``), else 0.0
code_tests        timeout=5.0, memory_mb=1024, workers=2,     1.0 if prompt + completion passes the record's
                  chat=false                                  HumanEval ``test`` (eval/judge.py: the test runs
                                                              in a second sandbox), else 0.0; exits and
                                                              introspection score 0 (eval/screen.py) and are
                                                              logged as ``reward_hacking_attempts``; needs
                                                              ``eval.allow_code_execution: true``
reward_model      run_dir*, device=auto                       r(x, y) of a tunelab ``objective: reward`` run on
                                                              the prompt + completion ids as sampled (same
                                                              tokenizer; else re-tokenised text, said once):
                                                              a completion cut by max_new_tokens is scored
                                                              with its turn left open (no end of turn), and
                                                              nothing subtracted unless
                                                              ``ppo.missing_eot_penalty`` p > 0 (default 0:
                                                              s' = s − p for cut rows)
format            pattern=``#### <number>`` at the end        1.0 if ``re.search(pattern, completion)``, else 0
truncation        (none)                                      −1.0 if the completion hit ``max_new_tokens``
                                                              (finish reason ``length``), else 0.0
length_penalty    target*, scale=target                       −min(1, max(0, n − target) / scale), n = tokens
"module:fn"       anything: passed to fn as keyword args      whatever your function returns — RUNS YOUR CODE
================  ==========================================  =================================================

``length_penalty`` is DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13) with
target = L_max − L_cache and scale = L_cache: free up to ``target`` tokens, then linearly down to −1.

**Composition.** `build_rewards(specs)` validates every spec (name, weight, options, the code-execution
opt-in, the reward-model run's files) before anything runs, and returns a `CompositeReward`; calling it gives
`RewardScores`: each function's unweighted scores (logged as ``reward_<name>``) and the weighted sum

    r_i = Σ_k w_k · r_k,i

that the advantage estimator sees. A built-in function may also report counts for the step's log: an attribute
``metrics`` (dict) set by its last call is added to `RewardScores.metrics` (``code_tests`` reports
``reward_hacking_attempts``). A weight of 0 logs a function without optimising it. A second use of the
same name is keyed ``<name>_2``. A function that raises, returns the wrong number of scores, or a non-finite
one stops the run with one line naming it: ``reward 'exact_match': KeyError: 'answer'``.

**Your own functions.** ``name: "package.module:function"`` imports the module (running its top-level code)
when the rewards are built — from the import path, the config's folder or the working directory — and calls
``function(batch: RewardInputs, **options) -> list[float]`` (or a TRL-style ``function(completions, **kwargs)``)
on every rollout batch, in the training process, with no sandbox: it is YOUR code, run with your permissions.
Each call must return within ``call_timeout`` seconds (default 60) and answer one real number per completion;
rl/user_rewards.py has the rules.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..data.formats import prompt_of
from ..data.sources import Record
from ..errors import TunelabError
from ..eval.code import SANDBOX_HELP, extract_code, judge_completions
from ..eval.exact import gold_answer, is_correct
from ..eval.sandbox import check_sandbox
from .model_reward import ModelReward
from .user_rewards import user_reward

RewardFn = Callable[["RewardInputs"], Sequence[float]]
EXTRACTORS = ("gsm8k", "last_number", "regex", "none")
GSM_FORMAT = r"####\s*-?\$?\d[\d,]*(?:\.\d+)?\s*$"  # "#### 1,000" as the completion's last words
_CODE_FIELDS = ("prompt", "test", "entry_point")


@dataclass(frozen=True)
class RewardInputs:
    """One batch of B rollouts, everything a reward function may look at (row i of every field is one rollout).

    Fields:
        completions      list of B str — the decoded completion text without the prompt, cut at the stop
                         strings (`generate.cut_at_stop`) but not stripped: a HumanEval continuation starts with
                         the function body's indentation (``code_tests`` with ``chat: false`` needs it).
        prompt_records   list of B `Record` — the source record each row's prompt came from (the n rows of one
                         prompt share it): holds the gold ``answer``, a HumanEval problem's ``test``, … Plain
                         dicts are accepted and wrapped as ``Record(d, "row i")``; pass Records to keep
                         ``file:line`` origins in error messages.
        completion_ids   list of B list[int] — the completion's tokens (padding removed), or None.
        finish_reasons   list of B str — ``"stop"`` or ``"length"`` (ran out of max_new_tokens), or None.
        prompt_messages  list of B chat prompts (list of {role, content}), or None: then they are read from
                         the record (its conversation minus the final assistant turn) where a function needs them.
        prompt_ids       list of B list[int] — the generation prompt's tokens the policy was given (padding
                         removed), or None.
        tokenizer        the policy's tokenizer, the vocabulary of `prompt_ids` and `completion_ids`, or None.
    """

    completions: list[str]
    prompt_records: list[Record]
    completion_ids: list[list[int]] | None = None
    finish_reasons: list[str] | None = None
    prompt_messages: list[list[dict]] | None = None
    prompt_ids: list[list[int]] | None = None
    tokenizer: object = None

    def __post_init__(self):
        records = [r if isinstance(r, Record) else Record(dict(r), f"row {i}")
                   for i, r in enumerate(self.prompt_records)]
        object.__setattr__(self, "prompt_records", records)
        B = len(self.completions)
        for name in ("prompt_records", "completion_ids", "finish_reasons", "prompt_messages", "prompt_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != B:
                raise ValueError(f"RewardInputs: {name} has {len(value)} rows, completions has {B}")

    def __len__(self) -> int:
        return len(self.completions)

    @classmethod
    def from_samples(cls, samples, completions: list[str], records: Sequence[Record | dict],
                     messages: Sequence[list[dict]] | None = None, tokenizer=None) -> "RewardInputs":
        """From `sampling.sample()`'s `Samples`, its decoded texts and the policy's `tokenizer`; `records`/
        `messages` are per *prompt* and are repeated for each of that prompt's rows (``samples.prompt_index``)."""
        index = samples.prompt_index.tolist()
        mask = samples.prompt_mask.bool().tolist()
        prompts = [[t for t, m in zip(row, keep) if m] for row, keep in zip(samples.prompt_ids.tolist(), mask)]
        return cls(list(completions), [records[i] for i in index], samples.completions(),
                   list(samples.finish_reason), None if messages is None else [messages[i] for i in index],
                   prompts, tokenizer)

    def messages(self, i: int) -> list[dict]:
        """Row i's prompt as chat messages: given, or `data.formats.prompt_of` (the record without its answer)."""
        if self.prompt_messages is not None:
            return self.prompt_messages[i]
        return prompt_of(self.prompt_records[i])

    def token_counts(self) -> list[int]:
        """Tokens per completion (a reward that calls this needs `completion_ids`)."""
        if self.completion_ids is None:
            raise TunelabError("needs the completion token ids (RewardInputs.completion_ids)")
        return [len(ids) for ids in self.completion_ids]


# ---- the built-in rewards: each factory takes the spec's options and returns a RewardFn ----------------------

REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register(name: str):
    """Decorator: add a reward factory ``factory(**options) -> RewardFn`` to `REWARDS` under `name`."""
    def add(factory):
        REWARDS[name] = factory
        return factory
    return add


@register("exact_match")
def exact_match(*, extract: str = "gsm8k", answer_field: str = "answer", regex: str | None = None,
                ignore_case: bool = False) -> RewardFn:
    """1.0 when the completion's extracted answer equals the record's gold answer (eval/exact.py), else 0.0."""
    if extract not in EXTRACTORS:
        raise TunelabError(f"reward 'exact_match': extract must be one of {', '.join(EXTRACTORS)}, not {extract!r}")
    if extract == "regex":
        _compile("exact_match", regex)

    def score(batch: RewardInputs) -> list[float]:
        return [float(is_correct(text, gold_answer(rec, answer_field, extract), extract, regex, ignore_case)[0])
                for text, rec in zip(batch.completions, batch.prompt_records)]
    return score


@register("code_tests")
def code_tests(*, timeout: float = 5.0, memory_mb: int = 1024, workers: int = 2, chat: bool = False,
               allow_code_execution: bool = False, sandbox: str = "bwrap") -> RewardFn:
    """1.0 when prompt + completion passes the record's HumanEval ``test`` (eval/code.py `judge_completions`:
    screened, then judged from a second sandbox), else 0.0. Code blocks are taken from chat replies
    (``chat: true``) as the ``chat`` code task does. After each call ``score.metrics`` holds
    ``reward_hacking_attempts``: how many completions of the batch the screen flagged."""
    if not allow_code_execution:
        raise TunelabError("reward 'code_tests' executes model-written code; opt in with "
                           f"eval.allow_code_execution: true in the run config (tunelab train CONFIG "
                           f"eval.allow_code_execution=true) {SANDBOX_HELP}")
    if not (timeout > 0 and memory_mb > 0 and workers >= 1):
        raise TunelabError("reward 'code_tests': timeout, memory_mb and workers must be positive")
    check_sandbox(sandbox)

    def score(batch: RewardInputs) -> list[float]:
        pairs = []
        for text, rec in zip(batch.completions, batch.prompt_records):
            missing = [k for k in _CODE_FIELDS if not isinstance(rec.data.get(k), str)]
            if missing:
                raise TunelabError(f"{rec.origin}: HumanEval-format problem needs string field(s) {', '.join(missing)}")
            pairs.append((rec.data, "\n" + extract_code(text) if chat else text))
        results = judge_completions(pairs, timeout=timeout, memory_mb=memory_mb, workers=workers, sandbox=sandbox)
        score.metrics = {"reward_hacking_attempts": sum(r.flagged is not None for r in results)}
        return [float(r.passed) for r in results]
    return score


@register("reward_model")
def reward_model(*, run_dir: str, device: str = "auto") -> RewardFn:
    """r(x, y) of a reward-model run (objectives/reward.py), loaded on first use; the run's files are checked now.

    Scored on the prompt + completion ids as sampled when the reward model shares the policy's tokenizer and
    prompt rendering (else on re-tokenised text, said once); a completion cut by max_new_tokens gets no end of
    turn. No penalty for a cut completion here: ``ppo.missing_eot_penalty`` (default 0) is s' = s − p for those
    rows. rl/model_reward.py has the details."""
    from ..objectives.reward import HEAD_FILE

    path = Path(run_dir)
    if not (path / HEAD_FILE).is_file() or not (path / "config.yaml").is_file():
        raise TunelabError(f"reward 'reward_model': {path} is not a finished reward-model run "
                           f"(needs {HEAD_FILE} and config.yaml)")
    return ModelReward(path, device)


@register("format")
def format_reward(*, pattern: str = GSM_FORMAT) -> RewardFn:
    """1.0 when ``re.search(pattern, completion)`` finds a match, else 0.0 (default: ends with ``#### N``)."""
    rx = _compile("format", pattern)
    return lambda batch: [float(rx.search(text) is not None) for text in batch.completions]


@register("truncation")
def truncation() -> RewardFn:
    """−1.0 for a completion cut off by max_new_tokens (finish reason ``length``), 0.0 otherwise."""
    def score(batch: RewardInputs) -> list[float]:
        if batch.finish_reasons is None:
            raise TunelabError("needs the finish reasons (RewardInputs.finish_reasons)")
        return [-1.0 if r == "length" else 0.0 for r in batch.finish_reasons]
    return score


@register("length_penalty")
def length_penalty(*, target: int, scale: int | None = None) -> RewardFn:
    """−min(1, max(0, n − target) / scale) for a completion of n tokens (DAPO's soft overlong punishment)."""
    scale = target if scale is None else scale
    if not (isinstance(target, int) and isinstance(scale, int) and target >= 0 and scale > 0):
        raise TunelabError(f"reward 'length_penalty': target must be an integer >= 0 and scale > 0 "
                           f"(got target={target!r}, scale={scale!r})")
    return lambda batch: [-min(1.0, max(0, n - target) / scale) for n in batch.token_counts()]


def _compile(reward: str, pattern) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise TunelabError(f"reward '{reward}': needs a regex pattern (got {pattern!r})")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise TunelabError(f"reward '{reward}': bad regex {pattern!r}: {e}") from None


# ---- composition ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardScores:
    """`CompositeReward`'s answer for a batch of B rollouts.

    total          list of B float — Σ_k w_k · r_k,i, the reward the advantages are computed from.
    per_function   {key: list of B float} — each function's unweighted scores, in spec order.
    weights        {key: w_k}.
    counts         {name: number} the functions reported for this batch (summed over functions), e.g.
                   ``reward_hacking_attempts``.
    """

    total: list[float]
    per_function: dict[str, list[float]]
    weights: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """For metrics.jsonl: batch means ``reward`` (weighted total) and ``reward_<key>`` per function, and
        the functions' counts as they are."""
        if not self.total:
            return {}
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {"reward": mean(self.total), **{f"reward_{k}": mean(v) for k, v in self.per_function.items()},
                **self.counts}


class CompositeReward:
    """Weighted sum of named reward functions; ``composite(batch) -> RewardScores``."""

    def __init__(self, entries: list[tuple[str, float, RewardFn]]):
        self.entries = entries

    @property
    def weights(self) -> dict[str, float]:
        return {key: w for key, w, _ in self.entries}

    def __call__(self, batch: RewardInputs) -> RewardScores:
        B = len(batch)
        per = {key: _checked(key, fn, batch, B) for key, _, fn in self.entries}
        total = [math.fsum(w * per[key][i] for key, w, _ in self.entries) for i in range(B)]
        counts: dict[str, float] = {}
        for _, _, fn in self.entries:
            for name, value in (getattr(fn, "metrics", None) or {}).items():
                counts[name] = counts.get(name, 0) + value
        return RewardScores(total, per, self.weights, counts)


def _checked(key: str, fn: RewardFn, batch: RewardInputs, B: int) -> list[float]:
    """Call one reward function; any failure, a wrong length or a non-finite score is one line naming it."""
    try:
        out = fn(batch)
    except TunelabError as e:
        raise TunelabError(f"reward '{key}': {e}") from e
    except Exception as e:  # noqa: BLE001 — reward code is user-configurable; name it rather than dump a traceback
        raise TunelabError(f"reward '{key}': {type(e).__name__}: {e}") from e
    try:
        scores = [float(x) for x in out]
    except (TypeError, ValueError) as e:
        raise TunelabError(f"reward '{key}': must return {B} numbers, got {type(out).__name__} ({e})") from None
    if len(scores) != B:
        raise TunelabError(f"reward '{key}': returned {len(scores)} scores for a batch of {B} completions")
    bad = next((i for i, x in enumerate(scores) if not math.isfinite(x)), None)
    if bad is not None:
        raise TunelabError(f"reward '{key}': non-finite score {scores[bad]} for row {bad}")
    return scores


def build_rewards(specs: Sequence[Mapping], *, allow_code_execution: bool = False,
                  sandbox: str = "bwrap") -> CompositeReward:
    """Validate ``rl.rewards`` and build the functions: ``[{name, weight=1.0, **options}, …]`` → `CompositeReward`.

    `allow_code_execution` is the explicit opt-in ``code_tests`` needs (``eval.allow_code_execution``), and
    `sandbox` where its code runs (``eval.sandbox``); neither is a per-reward option.
    """
    if not specs:
        raise TunelabError("rl.rewards is empty: list at least one reward (e.g. - {name: exact_match})")
    entries, seen = [], {}
    for i, spec in enumerate(specs):
        spec = dict(spec.model_dump() if hasattr(spec, "model_dump") else spec)
        name = spec.pop("name", None)
        weight = spec.pop("weight", 1.0)
        if not isinstance(name, str):
            raise TunelabError(f"rl.rewards[{i}]: needs a 'name' (known: {', '.join(REWARDS)}, or 'module:function')")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise TunelabError(f"reward '{name}': weight must be a finite number, not {weight!r}")
        fn = user_reward(name, spec) if ":" in name else _builtin(name, spec, allow_code_execution, sandbox)
        seen[name] = seen.get(name, 0) + 1
        entries.append((name if seen[name] == 1 else f"{name}_{seen[name]}", float(weight), fn))
    return CompositeReward(entries)


def _builtin(name: str, options: dict, allow_code_execution: bool, sandbox: str) -> RewardFn:
    if name not in REWARDS:
        raise TunelabError(f"unknown reward '{name}' (known: {', '.join(REWARDS)}; or 'module:function' for your own)")
    factory = REWARDS[name]
    params = inspect.signature(factory).parameters
    run_wide = ("allow_code_execution", "sandbox")
    accepted = [p for p, v in params.items() if p not in run_wide and v.kind == v.KEYWORD_ONLY]
    hit = next((k for k in run_wide if k in options), None)
    if hit:
        raise TunelabError(f"reward '{name}': {hit} is not a reward option; it is the run's eval.{hit}")
    open_ended = any(v.kind == v.VAR_KEYWORD for v in params.values())
    unknown = [] if open_ended else [k for k in options if k not in accepted]
    if unknown:
        raise TunelabError(f"reward '{name}': unknown option '{unknown[0]}' "
                           f"(options: {', '.join(accepted) or 'none'})")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in options]
    if missing:
        raise TunelabError(f"reward '{name}': missing option '{missing[0]}' (options: {', '.join(accepted)})")
    extra = {k: v for k, v in (("allow_code_execution", allow_code_execution), ("sandbox", sandbox)) if k in params}
    try:
        return factory(**options, **extra)
    except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
        raise TunelabError(f"reward '{name}': bad option value ({type(e).__name__}: {e})") from None

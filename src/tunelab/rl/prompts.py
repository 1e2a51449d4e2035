"""The ``prompts`` data kind: records → rendered, tokenised prompts for online RL (each with its source record,
which holds what the rewards check: the gold answer, unit tests, …).

A record's prompt is its conversation up to the answer (`data.formats.prompt_of`, the same rule the exact-match
evaluation uses), rendered with the run's chat template up to the assistant's turn — so a GRPO run on the GSM
data is prompted exactly as the ``gsm`` task prompts the model it measures. Prompts longer than
``data.max_length − rl.max_new_tokens`` are dropped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..data.formats import prompt_of
from ..data.kinds import EncodedData, register_kind
from ..data.masking import Encoded
from ..errors import TunelabError


@dataclass
class PromptExample:
    prompt_ids: list[int]
    prompt: str  # the rendered prompt text
    record: dict  # the source record's fields (gold answers, tests…) for the rewards
    origin: str  # file:line


def _identity(data: dict):
    """What makes a record the same problem: its task id, else its most specific prompt text."""
    if "task_id" in data:
        return ("task_id", str(data["task_id"]))
    for field in ("prompt", "question", "input", "messages", "instruction"):
        if field in data:
            return (field, json.dumps(data[field], sort_keys=True))
    return None


def check_unseen(train: list, cfg) -> None:
    """Refuse training prompts that are also problems of the run's eval tasks (`eval.target` / `eval.source`):
    RL optimises a reward on its prompts, so a held-out task (e.g. ``humaneval_heldout``, ``arith``) that shares
    problems with them would measure memorisation, not learning. One line naming both places."""
    from ..eval import load_task

    names = list(dict.fromkeys([*cfg.eval.target, *cfg.eval.source]))
    if not names:
        return
    seen = {k: e.origin for e in train if (k := _identity(e.record)) is not None}
    for name in names:
        task = load_task(name)
        for record in task.records():
            key = _identity(record.data)
            if key in seen:
                raise TunelabError(f"{seen[key]}: this training prompt is also problem {record.origin} of eval task "
                                   f"'{task.name}'; held-out tasks must stay unseen by training prompts")


class PromptData:
    name, unit = "prompts", "prompts"

    def check(self, cfg) -> None:
        if cfg.data.format not in ("auto", "alpaca", "messages", "prompt_completion"):
            raise TunelabError(f"data.format={cfg.data.format}: objective {cfg.objective} needs prompts "
                               "(alpaca, messages or prompt_completion records)")
        from .rewards import build_rewards

        from .sampler import check_sampler

        build_rewards(cfg.rl.rewards, allow_code_execution=cfg.eval.allow_code_execution,
                      sandbox=cfg.eval.sandbox)  # fail before any write
        check_sampler(cfg.rl)

    def _encode(self, tokenizer, template, records, budget: int | None):
        out, dropped = [], 0
        for r in records:
            text = template.generation_prompt(prompt_of(r))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if budget is not None and len(ids) > budget:
                dropped += 1
                continue
            out.append(PromptExample(ids, text, dict(r.data), r.origin))
        return out, dropped

    @staticmethod
    def _budget(cfg) -> int | None:
        """The longest prompt that leaves room for `rl.max_new_tokens` within `data.max_length`."""
        budget = None if cfg.data.max_length is None else cfg.data.max_length - cfg.rl.max_new_tokens
        if budget is not None and budget < 1:
            raise TunelabError(f"data.max_length={cfg.data.max_length} leaves no room for a prompt with "
                               f"rl.max_new_tokens={cfg.rl.max_new_tokens}")
        return budget

    def encode(self, tokenizer, template, train_records, eval_records, cfg) -> EncodedData:
        budget = self._budget(cfg)
        train, dropped = self._encode(tokenizer, template, train_records, budget)
        evals, _ = self._encode(tokenizer, template, eval_records, budget)
        if not train:
            raise TunelabError(f"no training prompt fits data.max_length={cfg.data.max_length} with "
                               f"rl.max_new_tokens={cfg.rl.max_new_tokens}")
        check_unseen(train, cfg)
        stats = {"n_examples": len(train), "n_dropped": dropped, "total_tokens": sum(len(e.prompt_ids) for e in train),
                 "trained_tokens": 0, "n_truncated": 0}
        return EncodedData(train, evals, [e.prompt for e in evals[:cfg.samples.n_heldout]], stats)

    def inspect(self, tokenizer, template, records, cfg, n: int):
        """The first `n` prompts as the policy is prompted with them: no token is a target (the completions the
        policy samples are what trains)."""
        shown, _ = self._encode(tokenizer, template, records[:n], self._budget(cfg))
        return [Encoded(e.prompt_ids, [False] * len(e.prompt_ids), False, 0, e.origin) for e in shown], None

    def batches(self, examples: list, cfg, pad_id: int, context=None):
        from .rollout import RolloutSource

        return RolloutSource(examples, cfg, context)

    def summary(self, stats: dict, n_eval: int) -> str:
        return (f"data: {stats['n_examples']} training prompts ({stats['total_tokens']:,} prompt tokens), {n_eval} "
                f"held out; dropped {stats['n_dropped']} too long for data.max_length − rl.max_new_tokens")


register_kind(PromptData())

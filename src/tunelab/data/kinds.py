"""Data kinds: how each objective's records become training examples, generation prompts and batches.

An objective names its kind (``Objective.data_kind``); the run orchestrator asks the kind, never the objective's
name, so adding an objective that trains on existing data touches no orchestration code.

=============  =======================================  ==========================================  ==========
kind           examples                                 batches                                      objectives
=============  =======================================  ==========================================  ==========
``sft``        `masking.Encoded` (any SFT format; the   packed (``data.packing``) or one example     sft
               desirable completions of unpaired data)  per row, `collate.collate`
``pairs``      `preference.PairExample`                 `train.batch_size` pairs, `collate_pairs`     dpo, simpo,
                                                                                                     orpo, reward
``unpaired``   `preference.UnpairedExample`             `train.batch_size` completions + KL partners kto
``prompts``    `rl.prompts.PromptExample` (registered   rollouts of the current policy               grpo, rloo,
               by tunelab.rl)                           (`rl.rollout.RolloutSource`)                 rejection_sampling, online_dpo, ppo
=============  =======================================  ==========================================  ==========

`inspect(tokenizer, template, records, cfg, n)` is what `tunelab data inspect` shows: the first `n` examples as
this kind trains on them (`masking.Encoded`, trained tokens flagged) and dataset stats where the kind has them.

`batches(examples, cfg, pad_id, context)` gets the run's context (model, tokenizer, template, objective) for
kinds that generate their batches (rollouts); static kinds ignore it and reshuffle their rows per epoch from
(seed, epoch) (`batches.shuffled_batches`). Preference kinds
score only the response, so they accept only ``data.masking: prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..console import console
from ..errors import TunelabError
from .batches import StaticBatches, shuffled_batches
from .checks import conversation_counts, pair_counts, summary_suffix, unpaired_counts, warn
from .collate import collate
from .formats import to_sample
from .masking import encode_dataset
from .packing import pack
from .preference import (collate_pairs, collate_unpaired, encode_pairs, encode_unpaired, inspect_pairs,
                         is_preference, is_unpaired, sft_samples, to_pair, to_unpaired)


@dataclass
class EncodedData:
    """A run's encoded data: training and held-out examples, held-out generation prompts (rendered), stats."""

    train: list
    eval: list
    eval_prompts: list[str]
    stats: dict


def _user_prompts(cfg, template) -> list[str]:
    return [template.generation_prompt([{"role": "user", "content": p}]) for p in cfg.samples.prompts]


def _shard(context) -> tuple[int, int]:
    """(rank, world) of a data-parallel run; (0, 1) without a context."""
    return (context.rank, context.world) if context is not None else (0, 1)


def held_out(examples: list, n_records: int, cfg, unit: str) -> list:
    """The encoded held-out set. When every held-out record lost its trained tokens to `data.max_length`: an
    explicit `data.eval` file is an error naming it; an auto-split of data.train (a tiny `data.limit`, say) only
    leaves the run without a held-out set — its training examples are fine, so it is not refused."""
    if examples or not n_records:
        return examples
    why = f"all {n_records} held-out {unit} keep no trained token at data.max_length={cfg.data.max_length}"
    if cfg.data.eval:
        raise TunelabError(f"data.eval {cfg.data.eval}: {why}; raise data.max_length")
    console.print(f"[yellow]warning: {why} (auto-split of data.train); training without a held-out set — give "
                  "data.eval or raise data.max_length[/]")
    return []


def training_set(encode):
    """Run `encode()` for the training split; its "nothing to train on" error says which split it is."""
    try:
        return encode()
    except TunelabError as e:
        raise TunelabError(f"training set (data.train): {e}") from None


def prompt_part(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def preference_under_sft(where: str, objective: str) -> TunelabError:
    return TunelabError(f"{where}: preference records (chosen/rejected) under objective {objective}; use objective: "
                        "dpo (or map a column with data.columns: {response: chosen} to train on the chosen answers)")


class SFTData:
    """Instruction / chat / plain-text examples with the configured loss mask.

    Preference pairs (chosen + rejected) are refused rather than silently trained on `chosen`: which answer to
    learn is the user's call, made explicit with ``data.columns: {response: chosen}`` (the renamed record is
    a prompt/response record). Unpaired (KTO) records train on their desirable completions."""

    name, unit = "sft", "examples"

    def check(self, cfg) -> None:
        if cfg.data.format == "preference":
            raise preference_under_sft("data.format=preference", cfg.objective)

    def samples(self, records, cfg):
        fmt = cfg.data.format
        if fmt == "auto":
            pair = next((r for r in records if is_preference(r.data)), None)
            if pair is not None:
                raise preference_under_sft(pair.origin.rsplit(":", 1)[0], cfg.objective)
        unpaired = lambda r: fmt == "unpaired" or (fmt == "auto" and is_unpaired(r.data))  # noqa: E731
        samples = [s for r in records for s in (sft_samples([r], fmt) if unpaired(r) else [to_sample(r, fmt)])]
        if cfg.data.long_text == "chunk":  # every plain text a whole document: chunked, never truncated
            samples = [replace(s, document=True) if s.text is not None else s for s in samples]
        return samples

    def encode(self, tokenizer, template, train_records, eval_records, cfg) -> EncodedData:
        d = cfg.data
        options = dict(template=template, mode=d.masking, turns=d.turns, max_length=d.max_length)
        train_s = self.samples(train_records, cfg)
        eval_s = self.samples(eval_records, cfg) if eval_records else []
        counts = warn(conversation_counts(train_s))
        train, stats = training_set(lambda: encode_dataset(tokenizer, train_s, **options))
        texts = {s.origin for s in train_s if s.text is not None and not s.document}
        cut_texts = sum(1 for e in train if e.truncated and e.origin in texts)
        if cut_texts:  # a tail lost without being asked for: say how to keep it
            console.print(f"{cut_texts} plain-text record(s) longer than data.max_length={d.max_length} lost their "
                          "tail; data.long_text: chunk trains every token, in max_length pieces (as for .txt files)")
        evals, _ = encode_dataset(tokenizer, eval_s, **options, require_any=False) if eval_s else ([], None)
        evals = held_out(evals, len(eval_s), cfg, "examples")
        prompts = [template.generation_prompt(prompt_part(s.messages))
                   for s in eval_s[:cfg.samples.n_heldout] if s.messages]
        return EncodedData(train, evals, prompts + _user_prompts(cfg, template), {**stats.as_dict(), **counts})

    def inspect(self, tokenizer, template, records, cfg, n: int):
        """(the first `n` examples as this kind trains on them, stats over `records`) for `tunelab data inspect`:
        any SFT format, unpaired data as its desirable completions (what SFT trains on)."""
        d = cfg.data
        examples, stats = encode_dataset(tokenizer, self.samples(records, cfg), template, mode=d.masking,
                                         turns=d.turns, max_length=d.max_length)
        return examples[:n], stats

    def batches(self, examples: list, cfg, pad_id: int, context=None) -> StaticBatches:
        packed = cfg.data.packing
        rows = pack(examples, cfg.data.max_length) if packed else [[e] for e in examples]
        group = not packed and getattr(cfg.data, "group_by_length", False)
        return shuffled_batches(rows, cfg.train.batch_size, cfg.train.seed,
                                lambda chunk: collate(chunk, pad_id, packed=packed), *_shard(context),
                                lengths=[len(r[0]) for r in rows] if group else None)

    def summary(self, stats: dict, n_eval: int) -> str:
        return (f"data: {stats['n_examples']} train examples ({stats['trained_tokens']:,} loss tokens of "
                f"{stats['total_tokens']:,}), {n_eval} held out; truncated {stats['n_truncated']}, "
                f"fully masked (dropped) {stats['n_fully_masked']}{summary_suffix(stats)}")


class PairData:
    """Preference pairs (prompt, chosen, rejected): one row per response, the prompt masked."""

    name, unit = "pairs", "pairs"
    format = "preference"

    def check(self, cfg) -> None:
        if cfg.data.masking != "prompt":
            raise TunelabError(f"data.masking={cfg.data.masking}: preference objectives score only the response "
                               "(use prompt)")
        if cfg.data.format not in ("auto", self.format):
            raise TunelabError(f"data.format={cfg.data.format}: objective {cfg.objective} needs {self.format} data")

    # what differs between paired and unpaired data: parse a record, encode samples, collate a micro-batch
    parse = staticmethod(to_pair)
    encode_samples = staticmethod(encode_pairs)
    collate = staticmethod(collate_pairs)
    counts = staticmethod(pair_counts)

    def encode(self, tokenizer, template, train_records, eval_records, cfg) -> EncodedData:
        train_s, eval_s = [self.parse(r) for r in train_records], [self.parse(r) for r in eval_records]
        counts = warn(self.counts(train_s))
        train, stats = training_set(lambda: self.encode_samples(tokenizer, train_s, template, cfg.data.max_length))
        evals, _ = (self.encode_samples(tokenizer, eval_s, template, cfg.data.max_length, require_any=False)
                    if eval_s else ([], None))
        evals = held_out(evals, len(eval_s), cfg, self.unit)
        prompts = [template.generation_prompt(s.prompt) for s in eval_s[:cfg.samples.n_heldout]]
        return EncodedData(train, evals, prompts + _user_prompts(cfg, template), {**stats.as_dict(), **counts})

    def inspect(self, tokenizer, template, records, cfg, n: int):
        """The first `n` records as trained: chosen and rejected (or an unpaired completion with its label),
        each prompt masked; no dataset-wide stats."""
        for r in records[:n]:
            self.parse(r)  # a record of the wrong shape: the same one-line error as training gives
        return inspect_pairs(tokenizer, template, records, cfg.data.max_length, n=n), None

    def batches(self, examples: list, cfg, pad_id: int, context=None) -> StaticBatches:
        return shuffled_batches(examples, cfg.train.batch_size, cfg.train.seed,
                                lambda chunk: self.collate(chunk, pad_id), *_shard(context))

    def summary(self, stats: dict, n_eval: int) -> str:
        return (f"data: {stats['n_examples']} training {self.unit} ({stats['trained_tokens']:,} response tokens "
                f"of {stats['total_tokens']:,}), {n_eval} held out; truncated {stats['n_truncated']}, "
                f"dropped {stats['n_dropped']}{summary_suffix(stats)}")


class UnpairedData(PairData):
    """Single completions labelled desirable / undesirable (KTO), each with a fixed mismatched KL partner."""

    name, unit = "unpaired", "examples"
    format = "unpaired"

    parse = staticmethod(to_unpaired)
    encode_samples = staticmethod(encode_unpaired)
    collate = staticmethod(collate_unpaired)
    counts = staticmethod(unpaired_counts)


KINDS = {k.name: k for k in (SFTData(), PairData(), UnpairedData())}


def register_kind(kind) -> None:
    """Add a data kind defined further down the path (online RL's ``prompts``, in `rl/prompts.py`)."""
    KINDS[kind.name] = kind


def data_kind(name: str):
    if name not in KINDS:
        raise ValueError(f"unknown data kind {name!r} (known: {', '.join(KINDS)}); is its module imported?")
    return KINDS[name]

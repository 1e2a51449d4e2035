"""Preference data: pairs (prompt, chosen, rejected) and unpaired examples (prompt, completion, label).

Pairwise layouts (`to_pair` detects them from the keys of each record):

``prompt/chosen/rejected``   strings, or lists of chat messages (TRL's conversational form). A multi-turn prompt
                             is a message list (it may contain earlier assistant turns). When chosen/rejected are
                             message lists that repeat the prompt (UltraFeedback-binarized style), the prompt
                             part is stripped. An optional ``system`` string is prepended to a string prompt.
``chosen/rejected`` only     message lists sharing a prefix (the prompt is their longest common prefix), or
                             Anthropic HH strings (``"\\n\\nHuman: … \\n\\nAssistant: …"``).
``system/question/chosen/rejected``  the Orca DPO pairs layout (Intel/orca_dpo_pairs).
``instruction/input?/chosen/rejected`` Alpaca-style instruction pairs.
An optional numeric ``margin`` (how much better chosen is) is kept for the reward model's margin loss.

Unpaired (KTO): ``prompt`` (string or messages), ``completion`` (string or messages), boolean ``label``
(True = desirable). Hugging Face datasets with these layouts load by name through `sources.load_records`.

Encoding uses the same chat templates as SFT with the loss on the *final assistant response and its end of turn
only* (masking mode ``prompt``, turns ``last``): a preference objective scores log π(response | prompt), so
prompt tokens must not count. A pair whose chosen or rejected side keeps no response token after truncation is
dropped and counted (comparing a response with nothing is meaningless).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import TunelabError
from .formats import Sample, chat_messages
from .masking import Encoded, encode
from .sources import Record
from .templates import Template, sample_segments

PAIR_KEYS = ("chosen", "rejected")


@dataclass
class PairSample:
    prompt: list[dict]
    chosen: dict  # one assistant message
    rejected: dict
    origin: str
    margin: float | None = None


@dataclass
class UnpairedSample:
    prompt: list[dict]
    completion: dict
    label: bool
    origin: str


@dataclass
class PairExample:
    """A tokenized pair; `ref` holds cached reference log-probs (chosen, rejected) once precomputed."""

    chosen: Encoded
    rejected: Encoded
    origin: str
    margin: float = 0.0
    ref: tuple[float, float] | None = None


@dataclass
class UnpairedExample:
    """A tokenized completion plus its KL partner: the same prompt with another example's completion."""

    example: Encoded
    kl: Encoded
    label: bool
    origin: str
    ref: tuple[float, float] | None = None  # (completion, kl) reference log-probs once precomputed


@dataclass
class PrefStats:
    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    n_desirable: int = 0
    n_undesirable: int = 0
    dropped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "dropped"}


# ------------------------------------------------------------------------------------------------ parsing
def is_preference(data: dict) -> bool:
    return all(k in data for k in PAIR_KEYS)


def is_unpaired(data: dict) -> bool:
    return "completion" in data and "label" in data


def _text(record: Record, key: str) -> str:
    value = record.data.get(key)
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise TunelabError(f"{record.origin}: field '{key}' must be a string ({got})")
    return value


def _as_messages(record: Record, key: str, role: str) -> list[dict]:
    value = record.data.get(key)
    if isinstance(value, list):
        return chat_messages(value, f"{record.origin}: field '{key}'")
    return [{"role": role, "content": _text(record, key)}]


_HH = re.compile(r"\n\n(Human|Assistant): ")


def _hh_messages(text: str) -> list[dict] | None:
    """Anthropic HH-RLHF transcript → messages, or None when the text is not in that layout."""
    parts = _HH.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": body}
            for who, body in zip(parts[1::2], parts[2::2])]


def _one_response(msgs: list[dict], record: Record, key: str) -> dict:
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise TunelabError(f"{record.origin}: field '{key}' must be one assistant response after the prompt "
                           f"(got roles {[m['role'] for m in msgs]})")
    return msgs[0]


def _strip_prompt(prompt: list[dict], msgs: list[dict]) -> list[dict]:
    """Chosen/rejected lists that repeat the prompt: keep what follows it."""
    return msgs[len(prompt):] if msgs[:len(prompt)] == prompt else msgs


def to_pair(record: Record) -> PairSample:
    """Parse one pairwise record (see the module docstring for the layouts)."""
    d, origin = record.data, record.origin
    if not is_preference(d):
        raise TunelabError(f"{origin}: not a preference pair: expected fields chosen and rejected "
                           f"(plus prompt, question or instruction); got {sorted(d)}")
    if "prompt" in d:
        prompt = _as_messages(record, "prompt", "user")
        if isinstance(d.get("system"), str) and d["system"].strip() and isinstance(d["prompt"], str):
            prompt = [{"role": "system", "content": d["system"]}] + prompt
    elif "question" in d:  # Orca DPO pairs
        prompt = [{"role": "user", "content": _text(record, "question")}]
        if isinstance(d.get("system"), str) and d["system"].strip():
            prompt = [{"role": "system", "content": d["system"]}] + prompt
    elif "instruction" in d:
        prompt = [{"role": "user", "content": _text(record, "instruction")}]
        if isinstance(d.get("input"), str) and d["input"]:
            prompt.append({"role": "input", "content": d["input"]})
    else:  # implicit prompt: shared prefix of two conversations
        sides = []
        for key in PAIR_KEYS:
            v = d[key]
            msgs = _hh_messages(v) if isinstance(v, str) else chat_messages(v, f"{origin}: field '{key}'")
            if msgs is None:
                raise TunelabError(f"{origin}: no prompt field and '{key}' is neither a message list nor an "
                                   "Anthropic HH transcript (\\n\\nHuman: … \\n\\nAssistant: …)")
            sides.append(msgs)
        n = 0
        while n < min(map(len, sides)) - 1 and sides[0][n] == sides[1][n]:
            n += 1
        prompt = sides[0][:n]
        if not prompt:
            raise TunelabError(f"{origin}: chosen and rejected share no prompt")
        return PairSample(prompt, _one_response(sides[0][n:], record, "chosen"),
                          _one_response(sides[1][n:], record, "rejected"), origin, _margin(record))
    chosen = _one_response(_strip_prompt(prompt, _as_messages(record, "chosen", "assistant")), record, "chosen")
    rejected = _one_response(_strip_prompt(prompt, _as_messages(record, "rejected", "assistant")), record,
                             "rejected")
    return PairSample(prompt, chosen, rejected, origin, _margin(record))


def _margin(record: Record) -> float | None:
    m = record.data.get("margin")
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        raise TunelabError(f"{record.origin}: field 'margin' must be a number")
    return float(m)


def to_unpaired(record: Record) -> UnpairedSample:
    d = record.data
    if not is_unpaired(d) or "prompt" not in d:
        raise TunelabError(f"{record.origin}: not an unpaired example: expected prompt, completion and label; "
                           f"got {sorted(d)}")
    label = d["label"]
    if not isinstance(label, bool):
        raise TunelabError(f"{record.origin}: field 'label' must be true or false (got {label!r})")
    prompt = _as_messages(record, "prompt", "user")
    completion = _one_response(_strip_prompt(prompt, _as_messages(record, "completion", "assistant")), record,
                               "completion")
    return UnpairedSample(prompt, completion, label, record.origin)


def sft_samples(records: list[Record], fmt: str = "auto") -> list[Sample]:
    """SFT view of preference data: prompt + chosen (pairs) or prompt + desirable completions (unpaired)."""
    out = []
    for r in records:
        if fmt == "unpaired" or (fmt == "auto" and is_unpaired(r.data) and not is_preference(r.data)):
            u = to_unpaired(r)
            if u.label:
                out.append(Sample(u.prompt + [u.completion], None, u.origin))
        else:
            p = to_pair(r)
            out.append(Sample(p.prompt + [p.chosen], None, p.origin))
    return out


# ----------------------------------------------------------------------------------------------- encoding
def encode_response(tokenizer, template: Template, prompt, response, origin, max_length) -> Encoded:
    segs = sample_segments(Sample(prompt + [response], None, origin), template)
    # Loss on the final answer only: earlier assistant turns of a multi-turn prompt are context.
    return encode(tokenizer, segs, mode="prompt", turns="last", max_length=max_length, origin=origin)


def _count(stats: PrefStats, *encs: Encoded) -> None:
    for e in encs:
        stats.total_tokens += len(e)
        stats.trained_tokens += e.n_trained


def encode_pairs(tokenizer, pairs: list[PairSample], template: Template, max_length: int | None = None,
                 require_any: bool = True) -> tuple[list[PairExample], PrefStats]:
    stats, out = PrefStats(), []
    for p in pairs:
        c = encode_response(tokenizer, template, p.prompt, p.chosen, f"{p.origin} chosen", max_length)
        r = encode_response(tokenizer, template, p.prompt, p.rejected, f"{p.origin} rejected", max_length)
        if c.n_trained == 0 or r.n_trained == 0:
            stats.n_dropped += 1
            stats.dropped.append(p.origin)
            continue
        out.append(PairExample(c, r, p.origin, p.margin or 0.0))
        stats.n_examples += 1
        stats.n_truncated += c.truncated or r.truncated
        _count(stats, c, r)
    if pairs and not out and require_any:
        raise TunelabError(f"all {len(pairs)} pairs lost their responses to truncation "
                           f"(max_length={max_length}); raise data.max_length")
    return out, stats


def _prompt_len(e: Encoded) -> int:
    return next(i for i, m in enumerate(e.loss_mask) if m)


def encode_unpaired(tokenizer, samples: list[UnpairedSample], template: Template, max_length: int | None = None,
                    require_any: bool = True) -> tuple[list[UnpairedExample], PrefStats]:
    """Encode, then give each example i the KL partner (prompt_i, completion_{i-1}) in dataset order — fixed per
    example (as in TRL), so reference log-probs of the partner can be cached too."""
    stats, kept = PrefStats(), []
    for s in samples:
        e = encode_response(tokenizer, template, s.prompt, s.completion, s.origin, max_length)
        if e.n_trained == 0:
            stats.n_dropped += 1
            stats.dropped.append(s.origin)
            continue
        kept.append((e, s))
    if samples and not kept and require_any:
        raise TunelabError(f"all {len(samples)} examples lost their completions to truncation "
                           f"(max_length={max_length}); raise data.max_length")
    out = []
    for i, (e, s) in enumerate(kept):
        other = kept[i - 1][0]  # i = 0 takes the last one: a cycle
        cut, ocut = _prompt_len(e), _prompt_len(other)
        ids = e.input_ids[:cut] + other.input_ids[ocut:]
        mask = [False] * cut + other.loss_mask[ocut:]
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):  # the partner's completion fell off the end: use this example's own completion
            ids, mask = list(e.input_ids), list(e.loss_mask)
        kl = Encoded(ids, mask, len(ids) < cut + len(other) - ocut, sum(mask), f"{s.origin} kl")
        out.append(UnpairedExample(e, kl, s.label, s.origin))
        stats.n_examples += 1
        stats.n_truncated += e.truncated
        stats.n_desirable += s.label
        stats.n_undesirable += not s.label
        _count(stats, e)
    return out, stats


def inspect_pairs(tokenizer, template: Template, records: list[Record], max_length: int | None = None,
                  n: int | None = None) -> list[Encoded]:
    """Encoded chosen and rejected (origins ``file:line chosen`` / ``… rejected``) of the first `n` records,
    interleaved, for `data inspect`; unpaired records give their completion (origin suffixed with the label)."""
    recs = records if n is None else records[:n]
    out: list[Encoded] = []
    for r in recs:
        if is_preference(r.data):
            p = to_pair(r)
            out.append(encode_response(tokenizer, template, p.prompt, p.chosen, f"{p.origin} chosen", max_length))
            out.append(encode_response(tokenizer, template, p.prompt, p.rejected, f"{p.origin} rejected", max_length))
        else:
            u = to_unpaired(r)
            tag = "desirable" if u.label else "undesirable"
            out.append(encode_response(tokenizer, template, u.prompt, u.completion, f"{u.origin} {tag}", max_length))
    return out


def prompt_messages(records: list[Record]) -> list[list[dict]]:
    """The prompts of preference/unpaired records (for before/after sample generations)."""
    return [(to_pair(r) if is_preference(r.data) else to_unpaired(r)).prompt for r in records]


# ------------------------------------------------------------------------------------------------ batches
def collate_pairs(items: list[PairExample], pad_id: int) -> dict:
    """One forward for a whole micro-batch of pairs: rows [chosen_1..chosen_P, rejected_1..rejected_P]."""
    import torch

    from .collate import collate

    batch = collate([e.chosen for e in items] + [e.rejected for e in items], pad_id)
    batch["margin"] = torch.tensor([e.margin for e in items], dtype=torch.float32)
    if all(e.ref is not None for e in items):
        batch["ref_logps"] = torch.tensor([e.ref[0] for e in items] + [e.ref[1] for e in items],
                                          dtype=torch.float32)
    return batch


def collate_unpaired(items: list[UnpairedExample], pad_id: int) -> dict:
    """Completions as the main rows, their KL partners under ``kl_*`` keys, labels as a bool [B] tensor."""
    import torch

    from .collate import collate

    batch = collate([e.example for e in items], pad_id)
    batch.update({f"kl_{k}": v for k, v in collate([e.kl for e in items], pad_id).items()})
    batch["label"] = torch.tensor([e.label for e in items], dtype=torch.bool)
    if all(e.ref is not None for e in items):
        batch["ref_logps"] = torch.tensor([e.ref[0] for e in items], dtype=torch.float32)
        batch["ref_kl_logps"] = torch.tensor([e.ref[1] for e in items], dtype=torch.float32)
    return batch

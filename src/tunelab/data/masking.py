"""Tokenize segmented samples once and decide, token by token, which ones the loss trains on.

**Mask semantics.** ``loss_mask[t] is True`` means token ``t`` is a prediction *target*: the loss includes
``-log p(input_ids[t] | input_ids[:t])``, computed from the logits at position ``t-1`` (the loop shifts).
Token 0 is therefore never a target (nothing precedes it), and `encode` sets ``loss_mask[0] = False``.

**Token → segment.** The concatenated text is tokenized in ONE call (``add_special_tokens=False`` — templates
carry their own bos) so the ids are exactly what the model will see at inference; splitting first and
tokenizing pieces would create merges that never occur in practice. With a fast tokenizer's offset mapping,
each token is assigned to the segment that holds its first non-whitespace character (its first character if
it is all whitespace): a BPE token like ``" the"`` glues the separator space to the next word, so it belongs
to that word's segment — otherwise a response's first word would be masked whenever the template puts a space
before the content (mistral's ``[/INST] answer``).

**Modes** (which segment kinds are trained; ``eot`` = the assistant's end-of-turn, e.g. ``<|im_end|>``):

==============  =========================================================================================
``prompt``      response + eot of trained assistant turns (the usual SFT "train on completions only").
``none``        every token except special tokens (``tokenizer.all_special_ids``) — "instruction
                modelling" (Shi et al. 2024, arXiv:2405.14394: loss on the instruction too helps when
                outputs are short / data is small). The eot of trained assistant turns IS trained, so the
                model still learns to stop.
``template``    prompt + response + eot; only the template's boilerplate (headers, default system prompt)
                is masked.
==============  =========================================================================================

``turns="last"`` trains only the final assistant turn; earlier assistant turns count as prompt (so in
``template`` mode they are still trained, being prompt). Plain-text samples (continued pretraining) train on
every token whatever the mode: the tokenizer's bos is prepended only if the tokenizer itself adds one by default
(Llama-style; SmolLM2 does not), and eos is appended and trained so documents learn to end. A longer plain text
is truncated like any example, except a whole document (a ``.txt`` file, or any text under ``data.long_text: chunk``;
``Sample.document``): it is split into
consecutive ``max_length`` chunks, each its own example (``notes.txt:1 chunk 2/5``), so no token is lost — the
first token of each chunk is its context only, as the first token of any row is.

**Prompt span** (``prompt_mask``, independent of the mode): the tokens before the first *trained* assistant
response — the system/user content and template text the model conditions on, assistant header included; with
``turns="last"`` earlier turns are part of it. This is what `Template.generation_prompt` renders for the
conversation up to that response, so methods that act on prompt positions (LoReFT) see the same tokens in
training and generation, whether the loss trains on the prompt or not. Plain-text samples have no prompt.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..errors import TunelabError
from .templates import Segment, Template, sample_segments

MODES = ("prompt", "none", "template")
TURNS = ("all", "last")


@dataclass
class Encoded:
    """One tokenized example: ids, per-token target flags, whether it was cut, how many targets it has, and
    its prompt span (see the module docstring; None = unknown, readers take the tokens before the first target)."""

    input_ids: list[int]
    loss_mask: list[bool]
    truncated: bool = False
    n_trained: int = 0
    origin: str = ""
    prompt_mask: list[bool] | None = None

    def __len__(self):
        return len(self.input_ids)


@dataclass
class DataStats:
    """What `encode_dataset` did: kept examples, cut ones, dropped ones (nothing left to train on)."""

    n_examples: int = 0
    n_truncated: int = 0
    n_fully_masked: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    dropped: list[str] = field(default_factory=list)  # origins of fully-masked examples

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "dropped"}


def check_options(mode: str, turns: str) -> None:
    if mode not in MODES:
        raise TunelabError(f"unknown loss mask mode '{mode}' (choose {', '.join(MODES)})")
    if turns not in TURNS:
        raise TunelabError(f"unknown turns '{turns}' (choose {', '.join(TURNS)})")


def _trained_kinds(segments: list[Segment], mode: str, turns: str) -> list[tuple[bool, bool]]:
    """Per segment: (trained, trained_even_if_special). The second flag is only set for trained eot text."""
    if any(s.kind == "text" for s in segments):
        return [(True, True)] * len(segments)
    assistant_turns = [s.turn for s in segments if s.kind in ("response", "eot")]
    last = max(assistant_turns, default=-1)
    out = []
    for s in segments:
        kind = s.kind
        if kind in ("response", "eot") and turns == "last" and s.turn != last:
            kind = "prompt"  # earlier assistant turns are context, not targets
        if mode == "prompt":
            out.append((kind in ("response", "eot"), kind == "eot"))
        elif mode == "template":
            out.append((kind != "boilerplate", kind == "eot"))
        else:  # "none": everything; special tokens are filtered later except in trained eot
            out.append((True, kind == "eot"))
    return out


def adds_bos(tokenizer) -> bool:
    """Does this tokenizer put bos in front by itself (and is bos a real start token, not eos)?"""
    bos = tokenizer.bos_token_id
    if bos is None or bos == tokenizer.eos_token_id:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _prompt_end(segments: list[Segment], turns: str) -> int:
    """Index of the first segment of the first trained assistant turn (len(segments) if there is none)."""
    assistant = [s.turn for s in segments if s.kind in ("response", "eot")]
    last = max(assistant, default=-1)
    return next((i for i, s in enumerate(segments) if s.kind in ("response", "eot")
                 and (turns == "all" or s.turn == last)), len(segments))


def _assign(segments: list[Segment], ids: list[int], offsets, mode: str, turns: str,
            max_length: int | None, special: set[int]) -> tuple[list[int], list[bool], list[bool], bool]:
    """Loss mask and prompt span for chat `ids` of the concatenated `segments` text, then truncation."""
    text = "".join(s.text for s in segments)
    starts, pos = [], 0
    for s in segments:
        starts.append(pos)
        pos += len(s.text)

    # Segment index holding character `c`: the last segment starting at or before it (empty ones never win).
    def owner(c: int) -> int:
        return bisect.bisect_right(starts, c) - 1

    flags = _trained_kinds(segments, mode, turns)
    end = _prompt_end(segments, turns)
    mask, prompt = [], []
    for tok_id, (a, b) in zip(ids, offsets):
        # First non-whitespace character of the token decides; fall back to its first character.
        first = next((c for c in range(a, b) if not text[c].isspace()), a)
        seg = owner(min(first, len(text) - 1))
        trained, eot = flags[seg]
        if mode == "none" and tok_id in special and not eot:
            trained = False
        mask.append(trained)
        prompt.append(seg < end)
    return _finish(ids, mask, prompt, max_length)


def _finish(ids: list[int], mask: list[bool], prompt: list[bool],
            max_length: int | None) -> tuple[list[int], list[bool], list[bool], bool]:
    truncated = max_length is not None and len(ids) > max_length
    if truncated:  # keep the left part: the prompt comes first
        ids, mask, prompt = ids[:max_length], mask[:max_length], prompt[:max_length]
    if mask:
        mask[0] = False  # nothing precedes token 0, so it can never be predicted
    return ids, mask, prompt, truncated


def _encode_text(tokenizer, text: str, max_length: int | None,
                 bos: bool) -> tuple[list[int], list[bool], list[bool], bool]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return _finish(ids, [True] * len(ids), [False] * len(ids), max_length)  # plain text: no prompt


def _tokenize(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, char offsets) per text. Fast tokenizers give offsets in one batched call."""
    if not texts:
        return []  # transformers chokes on an empty batch
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(list(i), [tuple(o) for o in off]) for i, off in zip(enc["input_ids"], enc["offset_mapping"])]
    raise TunelabError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; loss masking needs "
                       "character offsets (install `tokenizers` / use a model that ships tokenizer.json)")


def encode(tokenizer, segments: list[Segment], mode: str = "prompt", turns: str = "all",
           max_length: int | None = None, origin: str = "") -> Encoded:
    """Tokenize one segmented sample and build its loss mask (see module docstring for the semantics)."""
    check_options(mode, turns)
    return _encode_many(tokenizer, [segments], mode, turns, max_length, [origin])[0]


def _chunks(ex: Encoded, max_length: int | None) -> list[Encoded]:
    """A whole document's encoding split into consecutive `max_length` pieces (a 1-token tail, which holds no
    target, is dropped)."""
    if max_length is None or len(ex) <= max_length:
        return [ex]
    starts = [s for s in range(0, len(ex), max_length) if len(ex) - s > 1]
    out = []
    for k, s in enumerate(starts):
        ids = ex.input_ids[s:s + max_length]
        mask = [False] + [True] * (len(ids) - 1)
        out.append(Encoded(ids, mask, False, len(ids) - 1, f"{ex.origin} chunk {k + 1}/{len(starts)}",
                           [False] * len(ids)))
    return out


def _encode_many(tokenizer, seg_lists: list[list[Segment]], mode: str, turns: str, max_length: int | None,
                 origins: list[str], documents: list[bool] | None = None) -> list[Encoded]:
    special = set(tokenizer.all_special_ids)
    bos = any(s.kind == "text" for segs in seg_lists for s in segs) and adds_bos(tokenizer)
    chat = [i for i, segs in enumerate(seg_lists) if not any(s.kind == "text" for s in segs)]
    tokenized = dict(zip(chat, _tokenize(tokenizer, ["".join(s.text for s in seg_lists[i]) for i in chat])))
    out = []
    for i, segs in enumerate(seg_lists):
        if i in tokenized:
            ids, offsets = tokenized[i]
            ids, mask, prompt, cut = _assign(segs, ids, offsets, mode, turns, max_length, special)
        else:
            whole = bool(documents and documents[i])
            ids, mask, prompt, cut = _encode_text(tokenizer, "".join(s.text for s in segs),
                                                  None if whole else max_length, bos)
            if whole:
                out += _chunks(Encoded(ids, mask, cut, sum(mask), origins[i], prompt), max_length)
                continue
        out.append(Encoded(ids, mask, cut, sum(mask), origins[i], prompt))
    return out


def encode_dataset(tokenizer, samples, template: Template, mode: str = "prompt", turns: str = "all",
                   max_length: int | None = None, batch_size: int = 512,
                   require_any: bool = True) -> tuple[list[Encoded], DataStats]:
    """Encode every `formats.Sample`; examples with no trained token are dropped and counted.

    Raises `TunelabError` if nothing at all is left to train on (typically `max_length` too small to reach
    any response), unless `require_any` is off (a held-out set: the caller says which split it was).
    """
    check_options(mode, turns)
    if max_length is not None and max_length < 2:
        raise TunelabError(f"max_length must be at least 2 tokens, got {max_length}")
    samples = list(samples)
    stats = DataStats()
    kept: list[Encoded] = []
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo: lo + batch_size]
        segs = [sample_segments(s, template) for s in chunk]
        for ex in _encode_many(tokenizer, segs, mode, turns, max_length, [s.origin for s in chunk],
                               [getattr(s, "document", False) for s in chunk]):
            if ex.n_trained == 0:
                stats.n_fully_masked += 1
                stats.dropped.append(ex.origin)
                continue
            kept.append(ex)
            stats.n_examples += 1
            stats.n_truncated += ex.truncated
            stats.total_tokens += len(ex)
            stats.trained_tokens += ex.n_trained
    if not kept and require_any:
        why = (f" (max_length={max_length} cuts off every response)" if max_length is not None
               else f" (loss mask mode '{mode}', turns '{turns}')")
        raise TunelabError(f"all {stats.n_fully_masked} examples are fully masked: no token to train on{why}")
    return kept, stats

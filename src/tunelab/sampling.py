"""Token-level sampling: n completions per prompt as token ids *with* the sampler's log-probs.

Online RL (GRPO, PPO, rejection sampling / best-of-n) trains on what the policy actually generated. Text is
not enough: decoding to a string and tokenising it again does not give back the same ids (BPE merges across
the prompt/completion boundary, whitespace clean-up, special tokens), and the importance ratio
π_θ(a|s) / π_old(a|s) needs the old policy's log-prob of every generated token. `sample()` returns both.

The loop is our own, short enough to read in one go (Hugging Face `generate` hides it behind logits
processors and stopping criteria):

1. the prompts, already rendered and tokenised, are repeated `n` times (the copies of a prompt are adjacent
   rows) and left-padded in batches of `batch_size` rows, with an attention mask — SmolLM2's pad token *is*
   its eos token, so the mask is the only way to tell padding from content. Position ids are the running count
   of real tokens (mask cumsum − 1), so a left-padded prompt sees the same positions as an unpadded one;
2. prefill: one forward over the distinct prompts fills the KV cache and gives the logits of the first new
   token; the n copies of a prompt then share it (its cache rows are copied), so a prompt is encoded once;
3. each step picks one token per row from the last logits, appends it, and runs one forward of the new column
   only, reusing the cache; a row that has stopped leaves the running batch (its KV-cache rows are dropped), so
   decoding costs the real tokens, not rows × the longest completion. Greedy when `temperature == 0`, else sample from
   softmax(logits / temperature) restricted to the nucleus (top-p: the smallest set of most likely tokens
   whose probability reaches `top_p`, as Hugging Face's `TopPLogitsWarper`), drawn with a `torch.Generator`
   seeded by `seed`, so a seed reproduces the ids exactly;
4. a row stops at eos or any of `stop_token_ids` (e.g. a template's end-of-turn id), or when its text (decoded
   with special tokens) comes to contain a stop string; the loop ends when every row has stopped or after
   `max_new_tokens`.

Which log-prob: `logprobs[i, t] = log softmax(logits / temperature)[token]` — the model's distribution at the
sampling temperature, *before* top-p truncation (as TRL and verl compute the old-policy log-probs, from
logits / temperature), and at temperature 1 for greedy decoding. The truncated distribution is not used: top-p
gives probability 0 to tokens the policy can still produce when it is re-scored, which would make ratios
infinite. Scoring prompt+completion with a plain forward at the same temperature reproduces these numbers
(tests/test_sampling.py checks it to 1e-5 in fp32).

Adapters: a model wrapped by tunelab adapters is called like the bare model. LoReFT works too — it recognises
the prefill (a forward that starts an empty KV cache) and intervenes only there, on the prompt positions;
the decoding steps continue a non-empty cache and are not intervened (adapters/loreft_positions.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

from .console import advance, progress
from .errors import TunelabError
from .models.modes import eval_mode


@dataclass(frozen=True)
class Samples:
    """The rollouts of `sample()`: B = len(prompts) · n rows, the n completions of a prompt in adjacent rows.

    P is the longest prompt, T the longest completion (≤ max_new_tokens). All tensors are on the model's device.

    Fields:
        prompt_ids      [B, P] long — the prompt tokens, left-padded with the pad id.
        prompt_mask     [B, P] long — 1 on real prompt tokens, 0 on the left padding.
        completion_ids  [B, T] long — the generated tokens, right-padded with the pad id.
        completion_mask [B, T] long — 1 up to and including the stop token (eos, a stop token id, or the
                        token that completed a stop string), 0 after it; all 1 up to `max_new_tokens` for a
                        row that ran out of length. Sum over T = the completion's length.
        logprobs        [B, T] float32 — log π(token | prompt, earlier tokens) of each generated token under
                        log_softmax(logits / temperature), before top-p truncation (temperature 1 for greedy);
                        0 where completion_mask is 0. The old-policy log-probs of PPO/GRPO ratios.
        finish_reason   tuple of B str — "stop" (eos, a stop token or a stop string) or "length".
        prompt_index    [B] long — which input prompt each row comes from (0,0,…,1,1,… for n > 1).

    The text of a stop string stays in the completion (ids are never cut inside a token); cut the decoded text
    with `generate.cut_at_stop` when you need it clean. `prompt_ids`+`completion_ids` with their masks
    concatenated are ready for a scoring forward (mask cumsum − 1 as position ids).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    finish_reason: tuple[str, ...]
    prompt_index: torch.Tensor

    @property
    def completion_lengths(self) -> torch.Tensor:
        """[B] long: generated tokens per row, the stop token included."""
        return self.completion_mask.sum(dim=-1)

    def completions(self) -> list[list[int]]:
        """The completion ids of every row without the padding (Python lists)."""
        lengths = self.completion_lengths.tolist()
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), lengths)]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [len(rows), longest]: rows aligned to the right, padding and mask 0 on the left."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` [B, V] with every token outside the nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability sums to at least `top_p`; the most
    likely token always stays. Same rule as Hugging Face's `TopPLogitsWarper` (ascending sort, drop the tokens
    whose cumulative probability is ≤ 1 − top_p)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def pick(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], logprobs [B]) from next-token `logits` [B, V]: argmax for temperature 0, else a draw
    from softmax(logits / temperature) within the top-p nucleus. Log-probs: log_softmax(logits / temperature)
    before the nucleus cut (temperature 1 for greedy), in float32."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        scaled = logits
    else:
        scaled = logits / temperature
        probs = top_p_filter(scaled, top_p).softmax(dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    logprobs = scaled.log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs


class StopStrings:
    """Detects rows whose generated text has come to contain a stop string.

    Only the last few tokens are decoded (special tokens kept, so '<|im_end|>' can be a stop string): a stop
    string of L bytes spans at most L tokens, and one more token in front keeps tokenizers that drop a leading
    space at the start of a decode from hiding it. An occurrence must end in the newest token — an earlier one
    would have stopped the row already."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=0) + 2
        self.generated: list[list[int]] = []

    def __bool__(self) -> bool:
        return bool(self.stops)

    def reset(self, rows: int) -> None:
        self.generated = [[] for _ in range(rows)]

    def hit(self, rows: list[int], tokens: list[int]) -> list[bool]:
        """Append this step's token to each still-running row (by its index in the batch); True for each of those
        rows whose text now contains a stop string."""
        out = []
        for row, tok in zip(rows, tokens):
            seq = self.generated[row]
            seq.append(tok)
            text = self.tokenizer.decode(seq[-self.window:], skip_special_tokens=False)
            out.append(any(s in text for s in self.stops))
        return out


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_of(out) -> tuple[str, object]:
    """(keyword, cache) of a forward's output: transformers 5.x renamed `past_key_values` to `cache`, and the
    output field carries the same name as the forward's keyword."""
    for name in ("cache", "past_key_values"):
        cache = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if cache is not None:
            return name, cache
    raise TunelabError("sampling: the model returned no KV cache for use_cache=True")


def _select_rows(cache, keep: torch.Tensor) -> bool:
    """Keep only the `keep` rows of a KV cache in place; False when the cache type cannot (then nothing changed)."""
    select = getattr(cache, "batch_select_indices", None)
    if select is None:
        return False
    select(keep)
    return True


def _sample_batch(model, prompts, *, pad_id, stop_ids, stops: StopStrings, temperature, top_p,
                  max_new_tokens, generator, device, on_step=None):
    """One batch of rows: (completion ids [b, t], logprobs [b, t], lengths [b], finished-by-stop [b]).

    Rows that have stopped leave the running batch (their KV cache rows are dropped): the forward of each new
    column covers only the rows still generating, so a batch costs its real tokens, not b × its longest row."""
    ids, mask = left_pad(prompts, pad_id, device)
    b = ids.shape[0]
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    if stops:
        stops.reset(b)
    if max_new_tokens == 0:
        return tokens, logprobs, lengths, stopped
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    # the n copies of a prompt are adjacent rows: prefill each distinct prompt once, then copy its cache rows
    is_first = [i == 0 or prompts[i] != prompts[i - 1] for i in range(b)]
    first = [i for i in range(b) if is_first[i]]
    copies = torch.tensor(is_first, device=device).long().cumsum(0) - 1  # row → its prompt's prefill row
    out = model(input_ids=ids[first], attention_mask=mask[first], position_ids=positions[first], use_cache=True,
                **extra)
    logits = out.logits[:, -1, :]
    if len(first) < b:
        key, cache = _cache_of(out)
        if _select_rows(cache, copies):  # index_select with repeats: row i gets its prompt's cache
            logits = logits[copies]
        else:  # a cache that cannot be re-indexed: prefill every row
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
            logits = out.logits[:, -1, :]
    live = torch.arange(b, device=device)  # running row → batch row
    running = torch.ones(b, dtype=torch.bool, device=device)  # per running row: not stopped yet
    steps = 0
    for t in range(max_new_tokens):
        key, cache = _cache_of(out)
        new, lp = pick(logits, temperature, top_p, generator)
        rows, new_r = live[running], new[running]
        tokens[rows, t] = new_r
        logprobs[rows, t] = lp[running]
        lengths[rows] += 1
        ended = torch.isin(new_r, stop_ids) if stop_ids.numel() else torch.zeros_like(new_r, dtype=torch.bool)
        if stops:
            hits = stops.hit(rows.tolist(), new_r.tolist())
            ended = ended | torch.tensor(hits, dtype=torch.bool, device=device)
        stopped[rows] = ended
        if on_step is not None:  # streaming (tunelab chat): the token of each batch row, and which rows took one
            step_tokens, took = [pad_id] * b, [False] * b
            for row, tok in zip(rows.tolist(), new_r.tolist()):
                step_tokens[row], took[row] = tok, True
            on_step(step_tokens, took)
        steps = t + 1
        if bool(ended.all()) or steps == max_new_tokens:
            break
        if bool(ended.any()):
            running[running.clone()] = ~ended
            keep = running.nonzero().squeeze(-1)
            if _select_rows(cache, keep):
                live, new, mask, running = live[keep], new[keep], mask[keep], running[keep]
        # a cache that cannot drop rows keeps the stopped rows decoding pad; nothing of theirs is written
        new = torch.where(running, new, torch.full_like(new, pad_id))
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        out = model(input_ids=new.unsqueeze(-1), attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    use_cache=True, **{key: cache})
        logits = out.logits[:, -1, :]
    return tokens[:, :steps], logprobs[:, :steps], lengths, stopped


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, n: int = 1, temperature: float = 1.0,
           top_p: float = 1.0, max_new_tokens: int = 128, stop_token_ids: Sequence[int] | None = None,
           stop_strings: Sequence[str] = (), seed: int | None = None, batch_size: int = 16,
           on_step=None) -> Samples:
    """`n` completions of each tokenised prompt, as ids with their log-probs (see the module docstring).

    prompt_ids: one list of token ids per prompt, already rendered with the chat template and tokenised.
    temperature: 0 for greedy decoding; > 0 samples from softmax(logits / temperature).
    top_p: nucleus sampling (1.0: the whole vocabulary); ignored when greedy.
    stop_token_ids: ids that end a completion besides `tokenizer.eos_token_id` (e.g. a template's end-of-turn).
    stop_strings: texts that end a completion as soon as the decoded completion contains one.
    seed: seeds the sampling generator (on the model's device): the same seed gives the same ids.
    batch_size: rows (completions) per forward; the rows of a prompt stay together in order.
    on_step: called after every decoding step with (tokens, active): the token picked for each row of the
        current batch and whether that row was still generating (streaming output; an exception it raises,
        e.g. KeyboardInterrupt, ends sampling).
    """
    if n < 1:
        raise TunelabError(f"sampling: n={n}; give at least 1 completion per prompt")
    if temperature < 0:
        raise TunelabError(f"sampling: temperature={temperature} is negative; 0 means greedy")
    if not 0 < top_p <= 1:
        raise TunelabError(f"sampling: top_p={top_p} must be in (0, 1]")
    if max_new_tokens < 0:
        raise TunelabError(f"sampling: max_new_tokens={max_new_tokens} is negative")
    if batch_size < 1:
        raise TunelabError(f"sampling: batch_size={batch_size}; give at least 1 row per batch")
    prompts = [[int(t) for t in p] for p in prompt_ids]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise TunelabError(f"sampling: prompt {empty[0]} is empty; every prompt needs at least one token")
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    ids = set(stop_token_ids or ())
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    stop_ids = torch.tensor(sorted(ids), dtype=torch.long, device=device)
    stops = StopStrings(tokenizer, stop_strings)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    rows = [p for p in prompts for _ in range(n)]
    index = [i for i in range(len(prompts)) for _ in range(n)]

    parts = []
    progress(-(-len(rows) // batch_size))  # the batches, to the phase being shown (console.phase), if any
    with eval_mode(model):
        for k in range(0, len(rows), batch_size):
            parts.append(_sample_batch(model, rows[k:k + batch_size], pad_id=pad_id, stop_ids=stop_ids, stops=stops,
                                       temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                       generator=generator, device=device, on_step=on_step))
            advance()

    width = max((p[0].shape[1] for p in parts), default=0)
    grow = lambda x, v: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=v)  # noqa: E731
    completion_ids = torch.cat([grow(p[0], pad_id) for p in parts]) if parts else \
        torch.zeros((0, 0), dtype=torch.long, device=device)
    logprobs = torch.cat([grow(p[1], 0.0) for p in parts]) if parts else torch.zeros((0, 0), device=device)
    lengths = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, dtype=torch.long, device=device)
    stopped = torch.cat([p[3] for p in parts]).tolist() if parts else []
    completion_mask = (torch.arange(width, device=device) < lengths.unsqueeze(-1)).long()
    prompt_tensor, prompt_mask = left_pad(rows, pad_id, device)
    return Samples(prompt_ids=prompt_tensor, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, logprobs=logprobs,
                   finish_reason=tuple("stop" if s else "length" for s in stopped),
                   prompt_index=torch.tensor(index, dtype=torch.long, device=device))

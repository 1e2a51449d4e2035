"""Text generation with the run's own chat template (greedy or sampled, batched, KV cache).

Prompts are rendered with the template the model was trained with — saved in every run directory — so what
the model sees at generation time matches training exactly. `generate` is the text face of
`tunelab.sampling.sample`, which does the work on token ids: each prompt string is tokenised (no special
tokens added: the template already rendered them), batches are left-padded with an explicit attention mask
(SmolLM2's pad token *is* its eos token, so the mask is the only way to tell padding from content), decoding
stops at eos or as soon as a row's text contains a stop string, and the completion is decoded up to its stop
token and cut at the earliest stop string. Use `sample` directly when you need the ids and log-probs (RL).

`strip=False` keeps the continuation verbatim — needed for code, whose first token is the indentation of a
function body (stripping it turns a correct HumanEval answer into an IndentationError).
"""

from __future__ import annotations

from .sampling import sample

# Sampling defaults of `tunelab generate` and `tunelab chat` (one place, so both commands answer alike): greedy
# unless a temperature is given, top-p 0.95 when sampling, answers up to 256 new tokens.
DEFAULT_TEMPERATURE = 0.0   # 0 = greedy
SAMPLE_TEMPERATURE = 0.7    # `generate --sample` without --temperature
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_NEW_TOKENS = 256


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s) if s else -1
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, stop: list[str] = (),
             strip: bool = True, seed: int | None = None) -> list[str]:
    """Complete already-rendered prompt strings; returns only the generated continuations (`seed`: sampling
    reproduces exactly)."""
    stop = [s for s in stop if s]
    if not prompts:
        return []
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = sample(model, tokenizer, ids, temperature=temperature if do_sample else 0.0,
                 top_p=top_p if do_sample else 1.0, max_new_tokens=max_new_tokens, stop_strings=stop,
                 batch_size=batch_size, seed=seed)
    texts = []
    for row in out.completions():
        text = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop)
        texts.append(text.strip() if strip else text)
    return texts


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string (held back until known)."""
    for k in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class TextStream:
    """Streams one completion's text as `sample(..., batch_size=1, on_step=stream.on_step)` produces it.

    The ids generated so far are decoded as a whole every step (a token can end in the middle of a UTF-8 character
    or merge with the next when decoded) and only the new, settled suffix is passed to `write`: text ending in
    U+FFFD (an incomplete character) waits, an ending that could still be the start of a stop string waits until
    the next tokens tell, and the text is cut at the first stop string, as in `generate`. With `strip=True` leading
    whitespace is never written and trailing whitespace only once more text follows, so the pieces join to exactly
    `generate(...)`'s stripped text. `finish()` writes what is left and returns the whole text."""

    def __init__(self, tokenizer, stops: list[str], write=lambda text: None, strip: bool = False):
        self.tok, self.stops, self.write, self.strip = tokenizer, [s for s in stops if s], write, strip
        self.generated: list[int] = []
        self.shown = 0  # characters of text() already written (leading whitespace skipped counts as written)

    def text(self) -> str:
        return cut_at_stop(self.tok.decode(self.generated, skip_special_tokens=True), self.stops)

    def _emit(self, text: str, settled: int) -> None:
        if self.strip:
            if self.shown == 0:
                self.shown = len(text) - len(text.lstrip())
            settled = min(settled, len(text.rstrip()))
        if settled > self.shown:
            self.write(text[self.shown:settled])
            self.shown = settled

    def on_step(self, tokens, active) -> None:
        if not active[0]:
            return
        self.generated.append(tokens[0])
        text = self.text()
        settled = len(text) - held_back(text, self.stops)
        if text.endswith("\ufffd"):
            settled = min(settled, len(text) - 1)
        self._emit(text, settled)

    def finish(self) -> str:
        text = self.text().rstrip("\ufffd")  # an interrupted completion may end inside a character
        self._emit(text, len(text))
        return text.strip() if self.strip else text

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
             strip: bool = True) -> list[str]:
    """Complete already-rendered prompt strings; returns only the generated continuations."""
    stop = [s for s in stop if s]
    if not prompts:
        return []
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = sample(model, tokenizer, ids, temperature=temperature if do_sample else 0.0,
                 top_p=top_p if do_sample else 1.0, max_new_tokens=max_new_tokens, stop_strings=stop,
                 batch_size=batch_size)
    texts = []
    for row in out.completions():
        text = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop)
        texts.append(text.strip() if strip else text)
    return texts

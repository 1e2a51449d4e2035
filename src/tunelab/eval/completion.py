"""Raw completions for code and lm-eval: `tunelab.generate.generate` with the text kept verbatim.

A HumanEval completion *starts* with the indentation of the function body and lm-eval's `generate_until`
expects the continuation as is, so nothing is stripped; stop strings still end decoding early.
"""

from __future__ import annotations

from ..generate import cut_at_stop, generate  # noqa: F401 (cut_at_stop re-exported for eval modules)


def complete(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256, stop: list[str] = (),
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8) -> list[str]:
    """Continuations of already-rendered prompts, verbatim up to the first stop string."""
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop, do_sample=do_sample,
                    temperature=temperature, top_p=top_p, batch_size=batch_size, strip=False)

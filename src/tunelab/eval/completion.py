"""Raw completions for code and lm-eval: whitespace kept, stop strings end decoding early.

`tunelab.generate.generate` strips its outputs, which is right for chat answers but wrong for code: a
HumanEval completion *starts* with the indentation of the function body, and stripping it turns a correct
answer into an IndentationError. lm-eval's `generate_until` likewise expects the continuation verbatim.
This helper differs from `generate` only there: outputs are not stripped, and stop strings are passed to
Hugging Face generation (`stop_strings`) so a batch stops as soon as every row has hit one, instead of
running to `max_new_tokens`. Prompts are left-padded with an explicit attention mask, as in `generate`.
"""

from __future__ import annotations

import torch


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s) if s else -1
        if 0 <= i < cut:
            cut = i
    return text[:cut]


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256, stop: list[str] = (),
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8) -> list[str]:
    """Continuations of already-rendered prompts, verbatim up to the first stop string."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stop = [s for s in stop if s]
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if stop:
                kwargs.update(stop_strings=stop, tokenizer=tokenizer)
            ids = model.generate(**enc, **kwargs)
            for row in ids[:, enc["input_ids"].shape[1]:]:
                outs.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop))
    finally:
        tokenizer.padding_side = side
        model.train(was)
    return outs

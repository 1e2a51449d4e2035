"""Text generation with the run's own chat template (greedy or sampled, batched, KV cache).

Prompts are rendered with the template the model was trained with — saved in every run directory — so what
the model sees at generation time matches training exactly. Batches are left-padded with an explicit attention
mask (SmolLM2's pad token *is* its eos token, so the mask is the only way to tell padding from content).
Stop strings are handed to Hugging Face generation (`stop_strings`), so a batch stops as soon as every row has
hit one instead of running to `max_new_tokens`, and the text is cut at the earliest stop string.

`strip=False` keeps the continuation verbatim — needed for code, whose first token is the indentation of a
function body (stripping it turns a correct HumanEval answer into an IndentationError).
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
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, stop: list[str] = (),
             strip: bool = True) -> list[str]:
    """Complete already-rendered prompt strings; returns only the generated continuations."""
    was_training = model.training
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
                text = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop)
                outs.append(text.strip() if strip else text)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs

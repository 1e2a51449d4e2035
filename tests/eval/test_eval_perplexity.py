"""Perplexity = exp(token-weighted mean loss), checked against full-logit cross-entropy computed by hand."""

import math

import torch
import torch.nn.functional as F

from tunelab.data.formats import to_sample
from tunelab.data.masking import encode_dataset
from tunelab.data.templates import get_template
from tunelab.eval.perplexity import evaluate_perplexity
from tunelab.objectives.scoring import eval_loss

TEXTS = ["The quick brown fox jumps over the lazy dog.", "In the year 2889, people live in fairyland and " * 3]


def test_text_perplexity_matches_hand_computed_loss(tokenizer, tiny, make_task):
    model = tiny("llama").eval()
    task = make_task([{"text": t} for t in TEXTS], kind="perplexity", format="text", batch_size=1)
    res = evaluate_perplexity(model, tokenizer, get_template("chatml", tokenizer), task)
    total, count = 0.0, 0
    for text in TEXTS:
        # Plain text: every token after the first is a target, and eos is appended (SmolLM2 adds no bos).
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert res["n"] == 2 and res["details"]["tokens"] == count
    assert math.isclose(res["metrics"]["loss"], total / count, rel_tol=1e-5)
    assert math.isclose(res["metrics"]["perplexity"], math.exp(total / count), rel_tol=1e-5)
    # per document: its own mean loss; Σ nll / Σ tokens over the items is the task's token-weighted loss
    items = res["items"]
    assert len(items) == 2 and sum(it["tokens"] for it in items) == count
    assert math.isclose(sum(it["nll"] for it in items) / count, res["metrics"]["loss"], rel_tol=1e-6)
    assert all(math.isclose(it["score"], it["nll"] / it["tokens"]) for it in items)


def test_instruction_loss_equals_training_heldout_loss(tokenizer, tiny, make_task):
    rows = [{"instruction": "Add.", "input": f"{i} + {i}", "output": f"{i} + {i} = {2 * i}"} for i in range(5)]
    model = tiny("llama")
    template = get_template("chatml", tokenizer)
    task = make_task(rows, kind="perplexity", format="alpaca", masking="prompt", batch_size=2)
    res = evaluate_perplexity(model, tokenizer, template, task, limit=4)
    from tunelab.data.sources import Record

    samples = [to_sample(Record(r, "x"), "alpaca") for r in rows[:4]]
    examples, _ = encode_dataset(tokenizer, samples, template, mode="prompt")
    assert res["n"] == 4
    assert math.isclose(res["metrics"]["loss"], eval_loss(model, examples, tokenizer.pad_token_id), rel_tol=1e-5)

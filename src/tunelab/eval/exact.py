"""Generation + exact match: greedy decoding, answer extraction, comparison with the gold answer.

Prompts are rendered with the model's own chat template (or a task's raw ``prompt``), completed greedily in
batches with a KV cache by `tunelab.generate.generate`, cut at stop strings (the template's end-of-turn and
the task's ``stop``), and then an *extractor* pulls the answer out of the free text:

``gsm8k``        the number after ``####`` (GSM8K's answer line; lm-eval's "strict-match")
``last_number``  the last number in the output (lm-eval's "flexible-extract" for GSM8K)
``regex``        the task's ``regex``: group 1 when the pattern has a group, else the whole match (first match)
``none``         the whole output, stripped

Both sides are then normalised before comparing: whitespace stripped, a trailing period dropped, and numbers
compared as numbers (``$1,000`` = ``1000`` = ``1000.00``). An output with nothing to extract is wrong; the
share of outputs where the extractor found anything is reported as ``answer_found`` — a model that never
writes ``####`` scores 0 for a formatting reason, and this makes that visible.

``char_accuracy`` gives partial credit, position by position: the share of the gold answer's characters that
the extracted answer (the whole stripped output when nothing was extracted) reproduces at the same offset. It is
the MoRA paper's memorisation metric (Jiang et al. 2024, "character-level accuracy" of recalled UUIDs): exact
match stays at 0 long after a model has learned most of each string, and this shows the progress.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from ..data.formats import prompt_of
from ..errors import TunelabError
from ..generate import generate
from .tasks import Task, format_prompt, item_id

_GSM8K = re.compile(r"####\s*(-?[$0-9.,]*[0-9])")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str, method: str = "last_number", regex: str | None = None) -> str | None:
    """The answer inside a model output, or None when the extractor finds nothing."""
    if method == "gsm8k":
        m = _GSM8K.search(text)
        return m.group(1) if m else None
    if method == "last_number":
        found = _NUMBER.findall(text)
        return found[-1] if found else None
    if method == "regex":
        m = re.search(regex or "", text)
        if not m:
            return None
        return m.group(1) if m.re.groups else m.group(0)
    if method == "none":
        return text.strip()
    raise ValueError(f"unknown extractor {method!r}")


def normalize(answer: str, ignore_case: bool = False) -> str:
    """Canonical form for comparison: stripped, no trailing period, numbers without $ , or trailing zeros."""
    s = answer.strip().rstrip(".").strip()
    num = s.replace(",", "").replace("$", "")
    if _NUMBER.fullmatch(s) or re.fullmatch(r"-?\d+(\.\d+)?", num):
        try:
            d = Decimal(num)
            # Integral values print without a fraction ("18.00" -> "18"); others without trailing zeros.
            return str(d.quantize(Decimal(1))) if d == d.to_integral_value() else format(d.normalize(), "f")
        except InvalidOperation:
            pass
    return s.lower() if ignore_case else s


def is_correct(output: str, gold: str, method: str = "last_number", regex: str | None = None,
               ignore_case: bool = False) -> tuple[bool, str | None]:
    """(output's extracted answer matches gold, the extracted answer)."""
    pred = extract_answer(output, method, regex)
    if pred is None:
        return False, None
    return normalize(pred, ignore_case) == normalize(gold, ignore_case), pred


def char_accuracy(pred: str, gold: str) -> float:
    """Share of `gold`'s characters that `pred` has at the same position (1.0 = identical, extra text ignored)."""
    if not gold:
        return float(pred == gold)
    return sum(a == b for a, b in zip(pred, gold)) / len(gold)


def gold_answer(record, field: str, method: str) -> str:
    """The record's gold answer; a full GSM8K solution (with ``#### N``) is reduced to N."""
    if field not in record.data or record.data[field] is None:
        raise TunelabError(f"{record.origin}: missing answer field '{field}'")
    gold = str(record.data[field])
    if method == "gsm8k" and "####" in gold:
        gold = extract_answer(gold, "gsm8k") or gold
    return gold


def build_prompt(record, task: Task, template) -> str:
    """The text the model continues: the task's prompt, or the record's conversation up to its answer."""
    spec = task.spec
    if spec.prompt is not None:
        text = format_prompt(spec.prompt, record, task.name)
        return template.generation_prompt([{"role": "user", "content": text}]) if spec.use_chat else text
    messages = prompt_of(record, spec.format)
    return template.generation_prompt(messages)


def evaluate_exact(model, tokenizer, template, task: Task, limit: int | None = None) -> dict:
    """Score a ``kind: exact`` task: ``exact_match`` and ``answer_found`` (see the module docstring)."""
    spec = task.spec
    records = task.records(limit)
    prompts = [build_prompt(r, task, template) for r in records]
    golds = [gold_answer(r, spec.answer_field, spec.extract) for r in records]
    stop = list(spec.stops)
    if spec.use_chat or spec.prompt is None:
        stop += [s for s in template.stop_strings if s and s not in stop]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=spec.new_tokens, batch_size=spec.batch_size,
                       stop=stop)
    correct = found = chars = 0
    samples, items = [], []
    for i, (rec, out, gold) in enumerate(zip(records, outputs, golds)):
        ok, pred = is_correct(out, gold, spec.extract, spec.regex, spec.ignore_case)
        correct += ok
        found += pred is not None
        item_chars = char_accuracy(normalize(pred if pred is not None else out, spec.ignore_case),
                                   normalize(gold, spec.ignore_case))
        chars += item_chars
        items.append({"id": item_id(task.name, i, rec.data), "score": float(ok), "char_accuracy": item_chars,
                      "text": out, "extracted": pred})
        if len(samples) < 3:
            samples.append({"origin": rec.origin, "output": out, "extracted": pred, "gold": gold, "correct": ok})
    n = len(records)
    metrics = {"exact_match": correct / n, "answer_found": found / n, "char_accuracy": chars / n}
    return {"n": n, "metrics": metrics, "primary": "exact_match",
            "higher_is_better": {k: True for k in metrics}, "samples": samples, "items": items}

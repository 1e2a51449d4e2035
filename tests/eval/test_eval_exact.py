"""Exact match: answer extraction and normalisation cases, scoring with a stubbed generator, a real tiny run."""

import pytest

from tunelab.data.templates import get_template
from tunelab.eval import exact
from tunelab.eval.exact import evaluate_exact, extract_answer, is_correct, normalize


@pytest.mark.parametrize("text, method, regex, want", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "gsm8k", None, "7"),
    ("so the total is\n#### 1,234.", "gsm8k", None, "1,234"),
    ("#### $18.00", "gsm8k", None, "$18.00"),
    ("#### -5", "gsm8k", None, "-5"),
    ("The answer is 42.", "gsm8k", None, None),            # strict: no '####', nothing extracted
    ("I had 3 apples and 5 pears, 8 in total.", "last_number", None, "8"),
    ("It dropped to -12.5 degrees", "last_number", None, "-12.5"),
    ("costs $1,000 in all", "last_number", None, "$1,000"),
    ("no digits here", "last_number", None, None),
    ("The answer is: Paris, of course", "regex", r"answer is:? (\w+)", "Paris"),
    ("ANSWER=B", "regex", r"[A-D]$", "B"),
    ("  just this \n", "none", None, "just this"),
])
def test_extraction(text, method, regex, want):
    assert extract_answer(text, method, regex) == want


@pytest.mark.parametrize("a, b", [("1,234", "1234"), ("$18.00", "18"), ("18.", "18"), ("0.50", "0.5"),
                                  ("-7", "-7.0"), (" Paris ", "Paris")])
def test_normalisation_equates(a, b):
    assert normalize(a) == normalize(b)


def test_normalisation_keeps_differences():
    assert normalize("12") != normalize("1.2")
    assert normalize("Paris") != normalize("paris")
    assert normalize("Paris", ignore_case=True) == normalize("paris", ignore_case=True)
    assert is_correct("#### 72", "72", "gsm8k") == (True, "72")
    assert is_correct("the answer is 72", "72", "gsm8k") == (False, None)


def test_char_accuracy_counts_positions():
    gold = "b938451e-e325"
    assert exact.char_accuracy(gold, gold) == 1.0
    assert exact.char_accuracy("b938451e-e3XX", gold) == pytest.approx(11 / 13)
    assert exact.char_accuracy("b938", gold) == pytest.approx(4 / 13)           # too short: the rest is missing
    assert exact.char_accuracy(gold + "-extra", gold) == 1.0                    # trailing text is ignored
    assert exact.char_accuracy("x" + gold, gold) == 0.0                          # shifted: positions, not overlap
    assert exact.char_accuracy("", "") == 1.0 and exact.char_accuracy("a", "") == 0.0


def test_gold_with_full_gsm8k_solution_is_reduced():
    from tunelab.data.sources import Record

    rec = Record({"answer": "Natalia sold 48/2 = 24 clips in May.\n#### 72"}, "x:1")
    assert exact.gold_answer(rec, "answer", "gsm8k") == "72"


def test_scoring_with_stubbed_generation(tokenizer, tiny, make_task, monkeypatch):
    rows = [{"instruction": "Solve.", "input": f"What is {i} + {i}?", "output": f"#### {2 * i}",
             "answer": str(2 * i)} for i in (1, 2, 3)]
    task = make_task(rows, kind="exact", format="alpaca", extract="gsm8k", stop=["\n\n"])
    seen = {}

    def fake_generate(model, tok, prompts, **kw):
        seen.update(prompts=prompts, **kw)
        return ["1 + 1 = 2\n#### 2", "#### 5", "I think it is 6"]  # right, wrong, no '####'

    monkeypatch.setattr(exact, "generate", fake_generate)
    template = get_template("chatml", tokenizer)
    res = evaluate_exact(tiny("llama"), tokenizer, template, task)
    assert res["n"] == 3
    assert res["metrics"]["exact_match"] == pytest.approx(1 / 3)
    assert res["metrics"]["answer_found"] == pytest.approx(2 / 3)
    assert res["metrics"]["char_accuracy"] == pytest.approx(1 / 3)  # 1, 0 ('5' vs '4'), 0 ('I think…' vs '6')
    # per item: 0/1 score, the generation, ids stable across evaluations and tied to the item's content
    items = res["items"]
    assert [it["score"] for it in items] == [1.0, 0.0, 0.0] and items[1]["text"] == "#### 5"
    assert [it["id"].split(":")[:2] for it in items] == [[task.name, "0"], [task.name, "1"], [task.name, "2"]]
    again = evaluate_exact(tiny("llama"), tokenizer, template, task)
    assert [it["id"] for it in again["items"]] == [it["id"] for it in items]
    assert len({it["id"].split(":")[2] for it in items}) == 3  # different records, different hashes
    p = seen["prompts"][0]
    # Rendered with the template, the question in, the reference answer out, ready for the assistant turn.
    assert p.startswith("<|im_start|>user\nSolve.") and "What is 1 + 1?" in p and "#### 2" not in p
    assert p.endswith("<|im_start|>assistant\n")
    assert "\n\n" in seen["stop"] and "<|im_end|>" in seen["stop"] and seen["max_new_tokens"] == 256


def test_real_generation_on_tiny_model(tokenizer, tiny, make_task):
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}]
    task = make_task(rows, kind="exact", prompt="Q: {question}\nA:", chat=False, max_new_tokens=6)
    res = evaluate_exact(tiny("llama"), tokenizer, get_template("chatml", tokenizer), task)
    assert res["n"] == 2 and 0.0 <= res["metrics"]["exact_match"] <= 1.0
    assert isinstance(res["samples"][0]["output"], str)

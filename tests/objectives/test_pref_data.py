"""Preference data: every layout parses to the same pair, the loss covers only the response, batching."""

import json

import pytest

from tunelab.data.preference import (collate_pairs, collate_unpaired, encode_pairs, encode_unpaired, inspect_pairs,
                                     sft_samples, to_pair, to_unpaired)
from tunelab.data.sources import Record, load_records
from tunelab.data.templates import get_template
from tunelab.errors import TunelabError

U = {"role": "user", "content": "What is 2+2?"}
C = {"role": "assistant", "content": "4"}
R = {"role": "assistant", "content": "5"}


@pytest.mark.parametrize("data", [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": [U], "chosen": [C], "rejected": [R]},
    {"prompt": [U], "chosen": [U, C], "rejected": [U, R]},  # UltraFeedback-binarized: prompt repeated
    {"chosen": [U, C], "rejected": [U, R]},  # implicit prompt
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"},
    {"system": "", "question": "What is 2+2?", "chosen": "4", "rejected": "5"},  # Orca DPO pairs
    {"instruction": "What is 2+2?", "chosen": "4", "rejected": "5"},
])
def test_layouts(data):
    p = to_pair(Record(data, "f.jsonl:1"))
    assert (p.prompt, p.chosen, p.rejected) == ([U], C, R)


def test_system_multiturn_and_errors():
    p = to_pair(Record({"system": "Be brief.", "question": "Q", "chosen": "a", "rejected": "b"}, "o"))
    assert p.prompt[0] == {"role": "system", "content": "Be brief."}
    turns = [U, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    p = to_pair(Record({"prompt": turns, "chosen": "6", "rejected": "7", "margin": 2}, "o"))
    assert len(p.prompt) == 3 and p.margin == 2.0
    with pytest.raises(TunelabError, match=r"f:3: field 'rejected' must be one assistant response"):
        to_pair(Record({"prompt": "q", "chosen": "a", "rejected": [U, R]}, "f:3"))
    with pytest.raises(TunelabError, match="not a preference pair"):
        to_pair(Record({"prompt": "q", "chosen": "a"}, "f:4"))
    with pytest.raises(TunelabError, match="'label' must be true or false"):
        to_unpaired(Record({"prompt": "q", "completion": "a", "label": "yes"}, "f:5"))


def test_encoding_masks_only_the_response(tokenizer):
    tmpl = get_template("chatml", tokenizer)
    turns = [U, {"role": "assistant", "content": "four"}, {"role": "user", "content": "And 3+3?"}]
    pairs = [to_pair(Record({"prompt": turns, "chosen": "six", "rejected": "seven"}, "f:1"))]
    (ex,), stats = encode_pairs(tokenizer, pairs, tmpl)
    trained = lambda e: tokenizer.decode([i for i, m in zip(e.input_ids, e.loss_mask) if m])  # noqa: E731
    assert trained(ex.chosen) == "six<|im_end|>" and trained(ex.rejected) == "seven<|im_end|>"
    assert stats.n_examples == 1 and ex.chosen.origin == "f:1 chosen"
    # Truncation that leaves a side without response tokens drops the pair.
    n_prompt = next(i for i, m in enumerate(ex.chosen.loss_mask) if m)
    with pytest.raises(TunelabError, match="lost their responses"):
        encode_pairs(tokenizer, pairs, tmpl, max_length=n_prompt)


def test_inspect_and_batches(tokenizer):
    tmpl = get_template("chatml", tokenizer)
    recs = [Record({"prompt": f"q{i}", "chosen": "yes" * (i + 1), "rejected": "no"}, f"f:{i}") for i in range(3)]
    shown = inspect_pairs(tokenizer, tmpl, recs, n=2)
    assert [e.origin for e in shown] == ["f:0 chosen", "f:0 rejected", "f:1 chosen", "f:1 rejected"]
    exs, _ = encode_pairs(tokenizer, [to_pair(r) for r in recs], tmpl)
    b = collate_pairs(exs, tokenizer.pad_token_id)
    assert b["input_ids"].shape[0] == 6 and "ref_logps" not in b  # [chosen×3, rejected×3]
    assert b["input_ids"][0, :len(exs[0].chosen)].tolist() == exs[0].chosen.input_ids
    assert b["input_ids"][3, :len(exs[0].rejected)].tolist() == exs[0].rejected.input_ids
    for e in exs:
        e.ref = (-1.0, -2.0)
    assert collate_pairs(exs, 0)["ref_logps"].tolist() == [-1.0] * 3 + [-2.0] * 3


def test_unpaired_kl_partners(tokenizer):
    tmpl = get_template("chatml", tokenizer)
    recs = [Record({"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0}, f"f:{i}") for i in range(3)]
    exs, stats = encode_unpaired(tokenizer, [to_unpaired(r) for r in recs], tmpl)
    assert (stats.n_desirable, stats.n_undesirable) == (2, 1)
    text = lambda e: tokenizer.decode(e.input_ids)  # noqa: E731
    # example i is paired with completion i-1 (cyclically) under its own prompt
    assert "p1" in text(exs[1].kl) and "c0" in text(exs[1].kl) and "c1" not in text(exs[1].kl)
    assert "p0" in text(exs[0].kl) and "c2" in text(exs[0].kl)
    b = collate_unpaired(exs, tokenizer.pad_token_id)
    assert b["label"].tolist() == [True, False, True] and b["kl_input_ids"].shape[0] == 3
    assert [s.messages[-1]["content"] for s in sft_samples(recs)] == ["c0", "c2"]  # desirable only


def test_bundled_files_parse(tokenizer):
    from importlib.resources import files

    data = files("tunelab") / "assets" / "data"
    for name, at_least in (("gsm_pref.jsonl", 100), ("humaneval_pref.jsonl", 60)):
        recs = load_records(str(data / name))
        assert len(recs) > at_least
        rows = [json.loads(line) for line in (data / name).read_text().splitlines()[:20]]
        assert all(r["chosen"] != r["rejected"] for r in rows)
        to_pair(recs[0])
    kto = load_records(str(data / "kto_unpaired.jsonl"))
    labels = [to_unpaired(r).label for r in kto]
    assert 0.45 < sum(labels) / len(labels) < 0.55

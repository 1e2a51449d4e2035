"""Data that is valid but unusual: byte-order marks, non-UTF-8 bytes, suspicious records (counted and warned),
a held-out split that loses every example to max_length, and an unreachable hub."""

import json
import time

import pytest

from tunelab import hub
from tunelab.config import RunConfig, load_config
from tunelab.data.kinds import data_kind
from tunelab.data.sources import load_records
from tunelab.data.templates import get_template
from tunelab.errors import TunelabError

BOM = "\ufeff"


@pytest.mark.parametrize("name,text", [
    ("d.jsonl", BOM + '{"text": "a"}\n'),
    ("d.json", BOM + '[{"text": "a"}]'),
    ("d.csv", BOM + "text\na\n"),
])
def test_a_byte_order_mark_is_accepted(tmp_path, name, text):
    (tmp_path / name).write_text(text, encoding="utf-8")
    assert [r.data for r in load_records(str(tmp_path / name))] == [{"text": "a"}]


def test_a_config_with_a_byte_order_mark_loads(tmp_path):
    (tmp_path / "c.yaml").write_text(BOM + "train:\n  lr: 1.0e-3\n", encoding="utf-8")
    assert load_config(tmp_path / "c.yaml").train.lr == 1e-3


@pytest.mark.parametrize("name,raw,line", [
    ("d.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n', 3),
    ("d.csv", b"text\nok\nfine\ncaf\xe9\n", 4),
    ("d.json", b'[\n{"text": "a"},\n{"text": "caf\xe9"}\n]', 3),
    ("c.yaml", b"train:\n  lr: 1.0e-3\n# caf\xe9\n", 3),
])
def test_non_utf8_bytes_are_named_by_file_and_line(tmp_path, name, raw, line):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(TunelabError) as e:
        load_config(path) if name.endswith(".yaml") else load_records(str(path))
    assert str(e.value).startswith(f"{path}:{line}: not UTF-8 text (byte 0xe9")


def _cfg(tmp_path, **data):
    return RunConfig.model_validate({"data": {"train": "x.jsonl", "max_length": 64, **data},
                                     "samples": {"n_heldout": 0}})


def _records(rows, source="d.jsonl"):
    from tunelab.data.sources import Record

    return [Record(r, f"{source}:{i + 1}") for i, r in enumerate(rows)]


def test_suspicious_sft_records_are_counted_and_warned(tokenizer, capsys, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "and?"}]},
            {"instruction": "say nothing", "output": "  "},
            {"instruction": "add 1 + 1", "output": "2"}]
    data = data_kind("sft").encode(tokenizer, get_template("chatml", tokenizer), _records(rows), [], _cfg(tmp_path))
    assert data.stats["n_ends_with_user"] == 1 and data.stats["n_empty_response"] == 1
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "1 conversation(s) end with a user turn" in err and "(first: d.jsonl:1)" in err
    assert "empty assistant response (first: d.jsonl:2)" in err
    assert "1 end with a user turn, 1 empty responses" in data_kind("sft").summary(data.stats, 0)


def test_suspicious_pairs_are_counted_and_warned(tokenizer, capsys, tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "4"}, {"prompt": "3+3?", "chosen": "6", "rejected": ""},
            {"prompt": "1+1?", "chosen": "2", "rejected": "3"}]
    data = data_kind("pairs").encode(tokenizer, get_template("chatml", tokenizer), _records(rows), [],
                                     _cfg(tmp_path))
    assert data.stats["n_identical_pairs"] == 1 and data.stats["n_empty_side"] == 1
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "chosen == rejected (no preference signal) (first: d.jsonl:1)" in err and "(first: d.jsonl:2)" in err


def test_a_held_out_split_lost_to_max_length_does_not_refuse_valid_training_data(tokenizer, capsys, tmp_path):
    train = _records([{"instruction": "hi", "output": "ok"}] * 3)
    held = _records([{"instruction": "a very long question " * 20, "output": "ok"}], "d.jsonl")
    kind, tmpl = data_kind("sft"), get_template("chatml", tokenizer)
    data = kind.encode(tokenizer, tmpl, train, held, _cfg(tmp_path))  # an auto-split: run without a held-out set
    assert len(data.train) == 3 and data.eval == []
    assert "all 1 held-out examples keep no trained token" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(TunelabError, match=r"^data.eval held.jsonl: all 1 held-out examples"):
        kind.encode(tokenizer, tmpl, train, held, _cfg(tmp_path, eval="held.jsonl"))  # the user's own file: say so
    with pytest.raises(TunelabError, match=r"^training set \(data.train\): all 1 examples are fully masked"):
        kind.encode(tokenizer, tmpl, held, train, _cfg(tmp_path))
    pairs = _records([{"prompt": "a very long question " * 20, "chosen": "a", "rejected": "b"}])
    ok = _records([{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2)
    data = data_kind("pairs").encode(tokenizer, tmpl, ok, pairs, _cfg(tmp_path))
    assert len(data.train) == 2 and data.eval == []


def test_an_unreachable_hub_fails_fast(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # whatever tunelab switches to reach offline mode is put back after the test
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "_switched", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    from tunelab.models.load import load_model

    started = time.perf_counter()
    with pytest.raises(TunelabError, match="huggingface.co is unreachable"):
        load_records("tunelab-test/does-not-exist")
    with pytest.raises(TunelabError, match=r"^model not found: 'tunelab-test/nope' is not in the local"):
        load_model("tunelab-test/nope")
    assert time.perf_counter() - started < 15  # huggingface_hub's retries take ~30 s per file

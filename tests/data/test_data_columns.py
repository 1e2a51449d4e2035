"""`data.columns`: a file's columns renamed to the names tunelab reads, before the format is detected — for
data.train, data.eval and Hugging Face datasets; a missing mapped column is one line naming file:line."""

import pytest

from tests.helpers import write_config, write_jsonl
from tunelab.data.columns import rename_columns
from tunelab.data.formats import detect_format, to_sample
from tunelab.data.sources import Record, load_records
from tunelab.errors import TunelabError
from tunelab.objectives import load_run_config
from tunelab.train.prepare import run_records


def test_rename_then_detect_prompt_response(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4", "id": 1}])
    [rec] = rename_columns(load_records(str(src)), {"prompt": "question", "response": "answer"})
    assert rec.data == {"prompt": "2+2?", "response": "4", "id": 1} and rec.origin == f"{src}:1"
    assert detect_format(rec) == "prompt_completion"
    assert to_sample(rec).messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_rename_messages_and_text():
    chat = Record({"conversations_v2": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "c:1")
    [r] = rename_columns([chat], {"messages": "conversations_v2"})
    assert detect_format(r) == "messages" and to_sample(r).messages[-1] == {"role": "assistant", "content": "yo"}
    [t] = rename_columns([Record({"content": "plain words"}, "t:1")], {"text": "content"})
    assert to_sample(t).text == "plain words"


def test_missing_mapped_column_is_one_line_with_file_and_line(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": "b"}] * 6 + [{"q": "a", "answer": "b"}])
    with pytest.raises(TunelabError) as e:
        rename_columns(load_records(str(src)), {"prompt": "question", "response": "answer"})
    assert str(e.value) == f"{src}:7: no column 'question' (data.columns maps prompt ← question)"


def _cfg(tmp_path, **data):
    return load_run_config(write_config(tmp_path / "c.yaml", data=data))


def test_columns_apply_to_train_and_eval_files(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)])
    held = write_jsonl(tmp_path / "e.jsonl", [{"question": "qe", "answer": "ae"}, {"question": "qf"}])
    cfg = _cfg(tmp_path, train=str(train), eval=str(held), columns={"prompt": "question", "response": "answer"})
    missing = rf"^{held}:2: no column 'answer' \(data.columns maps response ← answer\)$"
    with pytest.raises(TunelabError, match=missing):
        run_records(cfg)
    held.write_text('{"question": "qe", "answer": "ae"}\n')
    tr, ev = run_records(cfg)
    assert [r.data for r in tr] == [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)]
    assert ev[0].data == {"prompt": "qe", "response": "ae"} and ev[0].origin == f"{held}:1"


def test_columns_apply_to_hub_datasets(tmp_path, monkeypatch):
    import datasets

    rows = [{"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None: rows)
    monkeypatch.setattr("tunelab.data.sources.go_offline_if_unreachable", lambda: None)
    cfg = _cfg(tmp_path, train="org/qa", eval_fraction=0.0, columns={"prompt": "question", "completion": "answer"})
    tr, _ = run_records(cfg)
    assert [r.data for r in tr] == [{"prompt": "q0", "completion": "a0"}, {"prompt": "q1", "completion": "a1"}]
    assert tr[1].origin == "org/qa[train]:row 1"


@pytest.mark.parametrize("columns, message", [
    ("question", "expected a mapping"),
    ({"prompt": "q", "response": "q"}, "column 'q' is mapped twice"),
    ({"prompt": ""}, "both sides must be column names"),
])
def test_bad_columns_option_is_one_line_with_the_config_line(tmp_path, columns, message):
    with pytest.raises(TunelabError) as e:
        _cfg(tmp_path, train="x.jsonl", columns=columns)
    lines = str(e.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'c.yaml'}:3: data.columns: ") and message in lines[0]


def test_build_examples_takes_the_same_mapping(tmp_path, tokenizer):
    from tunelab.data.pipeline import build_examples

    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    [ex], _, _ = build_examples(str(src), tokenizer, template="chatml",
                                columns={"prompt": "question", "response": "answer"})
    trained = tokenizer.decode([i for i, f in zip(ex.input_ids, ex.loss_mask) if f])
    assert trained == "4<|im_end|>"

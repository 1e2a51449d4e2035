"""Loading records from every supported source, with origins, and clean one-line errors."""

import json

import pytest

from tunelab.data.sources import load_records
from tunelab.errors import TunelabError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_origins_are_1_based_line_numbers_and_blank_lines_skipped(tmp_path):
    src = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b"}\n')
    recs = load_records(src)
    assert [r.data for r in recs] == [{"text": "a"}, {"text": "b"}]
    assert [r.origin for r in recs] == [f"{src}:1", f"{src}:3"]


def test_jsonl_limit_stops_early_before_a_bad_line(tmp_path):
    src = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b"}\nnot json\n')
    assert [r.data["text"] for r in load_records(src, limit=2)] == ["a", "b"]


def test_json_array_and_data_wrapper(tmp_path):
    arr = write(tmp_path / "a.json", json.dumps([{"text": "x"}, {"text": "y"}]))
    wrapped = write(tmp_path / "w.json", json.dumps({"data": [{"text": "z"}]}))
    recs = load_records(arr)
    assert [r.origin for r in recs] == [f"{arr}:[0]", f"{arr}:[1]"]
    assert load_records(wrapped)[0].data == {"text": "z"}
    assert load_records(wrapped)[0].origin == f"{wrapped}:[0]"


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    src = write(tmp_path / "lines.json", '{"text": "a"}\n{"text": "b"}\n')
    recs = load_records(src)
    assert [r.origin for r in recs] == [f"{src}:1", f"{src}:2"]


def test_csv_origin_is_the_line_where_the_row_starts(tmp_path):
    src = write(tmp_path / "d.csv", 'instruction,output\nhi,there\n"multi\nline",x\nlast,y\n')
    recs = load_records(src)
    assert [r.data for r in recs] == [{"instruction": "hi", "output": "there"},
                                      {"instruction": "multi\nline", "output": "x"},
                                      {"instruction": "last", "output": "y"}]
    assert [r.origin for r in recs] == [f"{src}:2", f"{src}:3", f"{src}:5"]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p0", "p1", "p2"], "completion": ["c0", "c1", "c2"]}), path)
    recs = load_records(str(path), limit=2)
    assert [r.data for r in recs] == [{"prompt": "p0", "completion": "c0"}, {"prompt": "p1", "completion": "c1"}]
    assert [r.origin for r in recs] == [f"{path}:row 0", f"{path}:row 1"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": "b"}\n{"text": \n', ":3: malformed JSON: Expecting value"),
    ('{"text": "a"}\n[1, 2]\n', ":2: expected a JSON object, got an array"),
    ('"just a string"\n', ":1: expected a JSON object, got a string"),
    ("\n\n", ": no records"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    src = write(tmp_path / "data.jsonl", content)
    with pytest.raises(TunelabError) as e:
        load_records(src)
    assert str(e.value).startswith(src + message)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content, message", [
    ('[{"text": "a"}, 3]', ":[1]: expected a JSON object, got a number"),
    ('{"rows": []}', ": expected a JSON array of objects"),
    ("[]", ": no records"),
    ('[\n{"text": "a"},\n{"text": }\n]', ":3: malformed JSON"),
])
def test_json_errors(tmp_path, content, message):
    src = write(tmp_path / "data.json", content)
    with pytest.raises(TunelabError, match="^" + __import__("re").escape(src + message)):
        load_records(src)


def test_csv_errors(tmp_path):
    src = write(tmp_path / "d.csv", "a,b\n1,2\n3,4,5\n")
    with pytest.raises(TunelabError, match=r"d\.csv:3: row has more cells"):
        load_records(src)
    empty = write(tmp_path / "e.csv", "a,b\n")
    with pytest.raises(TunelabError, match=r"e\.csv: no records"):
        load_records(empty)


def test_missing_file_unsupported_type_and_bad_parquet(tmp_path):
    with pytest.raises(TunelabError, match=r"nope\.jsonl: file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(TunelabError, match="file not found"):
        load_records("./some/dir/thing")
    xml = write(tmp_path / "d.xml", "hello")  # (.txt is read now: one plain-text document)
    with pytest.raises(TunelabError, match="unsupported file type '.xml'"):
        load_records(xml)
    bad = write(tmp_path / "d.parquet", "not parquet")
    with pytest.raises(TunelabError, match="not a readable parquet file"):
        load_records(bad)
    with pytest.raises(TunelabError, match="limit must be a positive"):
        load_records(bad, limit=0)


def test_hub_dataset_offline_gives_one_clean_line(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # The sandbox has no hub access; force offline mode so the failure is immediate instead of retried.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(TunelabError) as e:
        load_records("tunelab-test/does-not-exist:default")
    msg = str(e.value)
    assert msg.startswith("tunelab-test/does-not-exist:default: cannot load dataset from the Hugging Face hub")
    assert "\n" not in msg

"""`.txt` files for continued pretraining: a file is one document (nothing cut at blank lines), split into
data.max_length chunks instead of truncated; folders and globs of files; a short run trains on them."""

import json

import pytest

from tests.helpers import save_tiny_model, write_config
from tunelab.cli import main
from tunelab.data.formats import detect_format, to_sample
from tunelab.data.masking import encode_dataset
from tunelab.data.packing import pack
from tunelab.data.sources import load_records
from tunelab.data.templates import get_template
from tunelab.errors import TunelabError

DOC = "The first paragraph.\n\nThe second paragraph, after a blank line.\n"


def test_a_txt_file_is_one_text_document(tmp_path):
    (tmp_path / "notes.txt").write_text("\ufeff" + DOC)
    [rec] = load_records(str(tmp_path / "notes.txt"))
    assert rec.data == {"text": DOC} and rec.origin == f"{tmp_path / 'notes.txt'}:1" and rec.document
    assert detect_format(rec) == "text"
    sample = to_sample(rec, "text")
    assert sample.text == DOC and sample.document
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(TunelabError, match=r"empty\.txt: no records$"):
        load_records(str(tmp_path / "empty.txt"))


def test_folders_and_globs_of_files(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("bee")
    (corpus / "a.txt").write_text("ay")
    (corpus / "sub" / "c.txt").write_text("sea")
    (corpus / ".hidden.txt").write_text("never")
    (corpus / "README.md").write_text("not data")
    assert [r.data["text"] for r in load_records(str(corpus))] == ["ay", "bee", "sea"]
    assert [r.data["text"] for r in load_records(str(corpus / "*.txt"))] == ["ay", "bee"]
    assert [r.data["text"] for r in load_records(str(corpus / "**" / "*.txt"))] == ["ay", "bee", "sea"]
    assert [r.data["text"] for r in load_records(str(corpus), limit=2)] == ["ay", "bee"]
    with pytest.raises(TunelabError, match=r"nothing/\*\.txt: no file matches this pattern"):
        load_records(str(tmp_path / "nothing" / "*.txt"))
    (tmp_path / "void").mkdir()
    with pytest.raises(TunelabError, match="void: a folder with no .jsonl/.json/.csv/.parquet/.txt file in it"):
        load_records(str(tmp_path / "void"))
    with pytest.raises(TunelabError, match=r"README\.md \(matched by .*\): unsupported file type '\.md'"):
        load_records(str(corpus / "*"))


def test_a_long_document_is_chunked_not_truncated_and_packs(tmp_path, tokenizer):
    words = " ".join(f"word{i}" for i in range(300))
    (tmp_path / "long.txt").write_text(words)
    [rec] = load_records(str(tmp_path / "long.txt"))
    template = get_template("chatml", tokenizer)
    full = tokenizer(words, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    examples, stats = encode_dataset(tokenizer, [to_sample(rec)], template, max_length=64)
    assert [len(e) for e in examples][:-1] == [64] * (len(examples) - 1) and stats.n_truncated == 0
    assert sum((e.input_ids for e in examples), []) == full  # every token kept, in order
    assert all(e.loss_mask == [False] + [True] * (len(e) - 1) for e in examples)  # token 0 of a row: context
    assert examples[1].origin == f"{tmp_path / 'long.txt'}:1 chunk 2/{len(examples)}"
    # the same text as a JSONL text record is still one truncated example
    [cut], cut_stats = encode_dataset(tokenizer, [to_sample(load_records(str(_jsonl(tmp_path, words)))[0])],
                                      template, max_length=64)
    assert len(cut) == 64 and cut_stats.n_truncated == 1
    rows = pack(examples, 128)
    assert sum(len(r) for r in rows) == len(examples) and all(sum(map(len, r)) <= 128 for r in rows)


def _jsonl(tmp_path, text):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    return path


def test_training_on_a_folder_of_txt_files(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"fact {i} {j}." for j in range(60)))
    model = save_tiny_model(tmp_path / "m", tokenizer)
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), model={"name": str(model)},
                       data={"train": str(corpus), "max_length": 64, "eval_fraction": 0.0},
                       train={"max_steps": 2, "batch_size": 2}, samples={"n_heldout": 0})
    assert main(["train", str(cfg)]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["data"]["n_examples"] > 3 and res["data"]["n_truncated"] == 0  # documents chunked, not cut


def test_long_jsonl_texts_truncate_with_a_hint_or_chunk_when_asked(tmp_path, tokenizer, capsys):
    """{"text": …} records longer than max_length: by default cut (as SFTTrainer does), with one line naming the
    records that lost their tail and `data.long_text: chunk`; with it, every token trains, as for a .txt file."""
    long = " ".join(f"word{i}" for i in range(300))
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": long}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    model = save_tiny_model(tmp_path / "m", tokenizer)
    runs = {}
    for mode in ("truncate", "chunk"):
        cfg = write_config(tmp_path / f"{mode}.yaml", output_dir=str(tmp_path / mode), model={"name": str(model)},
                           data={"train": str(path), "max_length": 64, "eval_fraction": 0.0, "long_text": mode},
                           train={"max_steps": 1, "batch_size": 2}, samples={"n_heldout": 0})
        assert main(["train", str(cfg)]) == 0
        io = capsys.readouterr()
        data = json.loads((tmp_path / mode / "results.json").read_text())["data"]
        runs[mode] = (data, " ".join((io.out + io.err).split()))
    cut, out = runs["truncate"]
    assert cut["n_examples"] == 2 and cut["n_truncated"] == 1
    assert "1 plain-text record(s) longer than data.max_length=64 lost their tail" in out and "long_text: chunk" in out
    whole, out = runs["chunk"]
    n_tokens = len(tokenizer(long, add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert whole["n_truncated"] == 0 and whole["n_examples"] == 1 + -(-n_tokens // 64)
    assert "lost their tail" not in out

"""A run killed while appending to metrics.jsonl leaves a torn last line: resume, report and compare still work."""

import json

import pytest

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.jsonl import read_rows
from tunelab.lab.results import load_run
from tunelab.train.launch import train

TORN = '{"step": 3, "loss": 2.5, "lr": 0.0'  # cut short by a kill: no closing brace, no newline


def test_a_torn_last_row_is_dropped_and_cut_from_the_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n' + TORN)
    assert read_rows(path) == [{"step": 1}, {"step": 2}]
    assert path.read_text().endswith(TORN)  # readers do not write
    assert read_rows(path, repair=True) == [{"step": 1}, {"step": 2}]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'  # complete lines kept byte for byte


def test_damage_elsewhere_is_named_by_line_or_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": oops}\n{"step": 3}\n')
    with pytest.raises(TunelabError, match=r"m.jsonl:2: malformed log row"):
        read_rows(path, strict=True)
    assert read_rows(path) == [{"step": 1}, {"step": 3}]


def test_resume_after_a_kill_mid_write(tmp_path, tokenizer):
    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(out), model={"name": str(model_dir)},
                       data={"train": str(data), "max_length": 64},
                       train={"max_steps": 3, "batch_size": 2, "save_every": 1}, samples={"n_heldout": 0})
    train(load_config(cfg), stop_after=2)
    with (out / "metrics.jsonl").open("a") as f:
        f.write(TORN)  # the process died while writing step 3's row
    assert [r["step"] for r in load_run(out).metrics] == [1, 2]  # `tunelab report` reads what is there
    train(load_config(cfg))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]  # every line whole, no step twice
    assert json.loads((out / "results.json").read_text())["steps"] == 3

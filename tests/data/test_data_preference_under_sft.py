"""An SFT run pointed at a preference file stops with one line instead of silently training on `chosen`; the
explicit mapping (`data.columns: {response: chosen}`) trains on prompt + chosen."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import save_tiny_model, write_config, write_jsonl
from tunelab.cli import main

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [{"prompt": f"{i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(8)]
WANT = ("preference records (chosen/rejected) under objective sft; use objective: dpo (or map a column with "
        "data.columns: {response: chosen} to train on the chosen answers)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer)


def _cfg(tmp_path, model_dir, name="c.yaml", **data):
    return write_config(tmp_path / name, output_dir=str(tmp_path / "out"), model={"name": str(model_dir)},
                        data={"max_length": 64, **data}, train={"max_steps": 1}, samples={"n_heldout": 0})


def test_tunelab_train_refuses_pairs_under_sft_in_one_line(tmp_path, model_dir):
    os.makedirs(tmp_path / "data")
    write_jsonl(tmp_path / "data" / "prefs.jsonl", PAIRS)
    cfg = _cfg(tmp_path, model_dir, train="data/prefs.jsonl")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [f"error: data/prefs.jsonl: {WANT}"]
    assert not (tmp_path / "out").exists()


def test_a_pair_anywhere_in_a_mixture_and_format_preference_are_refused(tmp_path, model_dir, capsys):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "completion": "hello"}] * 4)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    mixed = _cfg(tmp_path, model_dir, "mixed.yaml", train=[str(sft), str(prefs)])
    declared = _cfg(tmp_path, model_dir, "declared.yaml", train=str(prefs), format="preference")
    for argv, culprit in ((["train", str(mixed)], str(prefs)), (["train", str(declared)], "data.format=preference"),
                          (["data", "inspect", str(_cfg(tmp_path, model_dir, train=str(prefs)))], str(prefs))):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {culprit}: {WANT}"]
        assert not (tmp_path / "out").exists()


def test_mapping_chosen_trains_on_prompt_and_chosen(tmp_path, model_dir, tokenizer, capsys):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    cfg = _cfg(tmp_path, model_dir, train=str(prefs), columns={"response": "chosen"})
    assert main(["data", "inspect", str(cfg), "--n", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    trained = ["".join(t for t, f in zip(r["tokens"], r["loss"]) if f) for r in rows]
    assert trained == ["0<|im_end|>", "2<|im_end|>"]  # the chosen answers, never the rejected ones
    assert main(["train", str(cfg)]) == 0 and (tmp_path / "out" / "results.json").exists()

"""Every user error ends with one clear line naming the culprit, exit status 2, no traceback, nothing written."""

import json

import pytest

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer)


def _run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _cfg(tmp_path, model_dir, data_path, **extra):
    sections = {"output_dir": str(tmp_path / "out"), "model": {"name": str(model_dir)},
                "data": {"train": str(data_path), "max_length": 64}, "train": {"max_steps": 1},
                "samples": {"n_heldout": 0}}
    for k, v in extra.items():
        sections[k] = {**sections.get(k, {}), **v} if isinstance(v, dict) else v
    return write_config(tmp_path / "c.yaml", **sections)


CASES = {
    "malformed_json": ('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n', {}, "d.jsonl:2: malformed JSON"),
    "missing_field": ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', {"data": {"format": "alpaca"}},
                      "d.jsonl:2: missing field 'output'"),
    "wrong_type": ('{"instruction": "a", "output": 3}\n', {}, "d.jsonl:1:"),
    "empty_dataset": ("", {}, "no records"),
    "unknown_template": (None, {"data": {"template": "nope"}}, "unknown template 'nope'"),
    "unknown_model": (None, {"model": {"name": "./no/such/model"}}, "model not found"),
    "bad_target": (None, {"lora": {"target_modules": ["qq_proj"]}}, "pattern 'qq_proj' matches no module"),
    "max_length_too_small": (None, {"data": {"max_length": 8}}, "max_length=8"),
    "bad_key": (None, {"train": {"lrr": 1}}, "train.lrr: unknown key"),
    "bad_value": (None, {"train": {"batch_size": "many"}}, "train.batch_size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line(case, tmp_path, capsys, model_dir):
    text, extra, expected = CASES[case]
    data = tmp_path / "d.jsonl"
    data.write_text(text if text is not None else "".join(json.dumps(r) + "\n" for r in alpaca_rows(4)))
    if case == "unknown_model":
        extra = {"model": {"name": "./no/such/model"}}
    cfg = _cfg(tmp_path, model_dir, data, **extra)
    rc, err = _run(capsys, ["train", str(cfg)])
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_key_names_file_line(tmp_path, capsys, model_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {model_dir}\ntrain:\n  lr: 1e-4\n  lrr: 3\n")
    rc, err = _run(capsys, ["train", str(cfg)])
    assert rc == 2 and err == [f"error: {cfg}:5: train.lrr: unknown key (did you mean train.lr?)"]


def test_override_errors(tmp_path, capsys, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    cfg = _cfg(tmp_path, model_dir, data)
    rc, err = _run(capsys, ["train", str(cfg), "lora.rr=3"])
    assert rc == 2 and err == ["error: override: lora.rr: unknown key (did you mean lora.r?)"]
    rc, err = _run(capsys, ["train", str(cfg), "noequals"])
    assert rc == 2 and "expected key=value" in err[0]


def test_missing_config_and_run_dir(tmp_path, capsys):
    rc, err = _run(capsys, ["train", str(tmp_path / "none.yaml")])
    assert rc == 2 and "config not found" in err[0]
    rc, err = _run(capsys, ["export", str(tmp_path), "--merged", str(tmp_path / "o")])
    assert rc == 2 and "not a tunelab run directory" in err[0]


def test_inspect_json_flags_match_masking(tmp_path, capsys, model_dir, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(3))
    cfg = _cfg(tmp_path, model_dir, data)
    assert main(["data", "inspect", str(cfg), "--n", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2
    first = rows[0]
    assert len(first["input_ids"]) == len(first["tokens"]) == len(first["loss"])
    trained = tokenizer.decode([i for i, f in zip(first["input_ids"], first["loss"]) if f])
    assert trained == alpaca_rows(3)[0]["output"] + "<|im_end|>"


def test_inspect_shows_chosen_and_rejected(tmp_path, capsys, model_dir):
    rows = [{"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = _cfg(tmp_path, model_dir, data, objective="dpo")  # a preference objective: both responses train
    assert main(["data", "inspect", str(cfg), "--n", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["origin"].split()[-1] for r in out] == ["chosen", "rejected"]
    for r, want in zip(out, ["4", "5"]):
        trained = "".join(t for t, f in zip(r["tokens"], r["loss"]) if f)
        assert trained.startswith(want) and trained.endswith("<|im_end|>")


def _inspect(capsys, cfg, n=1) -> list[dict]:
    assert main(["data", "inspect", str(cfg), "--n", str(n), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _trained(row) -> str:
    return "".join(t for t, f in zip(row["tokens"], row["loss"]) if f)


def test_inspect_shows_what_the_runs_objective_trains_on(tmp_path, capsys, model_dir):
    """`data inspect` goes through the config's objective's data kind: the same preference file shows pairs to
    DPO, prompt + chosen to SFT (once `data.columns` maps chosen to the response: SFT on pairs is explicit), and a
    prompts file shows GRPO its prompts with nothing trained."""
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}])
    mapped = {"data": {"columns": {"response": "chosen"}}}
    sft = _inspect(capsys, _cfg(tmp_path, model_dir, pairs, **mapped))  # objective: sft (the default)
    assert len(sft) == 1 and not sft[0]["origin"].endswith(("chosen", "rejected"))
    assert _trained(sft[0]).startswith("4") and _trained(sft[0]).endswith("<|im_end|>")
    assert "5" not in _trained(sft[0])
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "2 + 2?", "completion": "5", "label": False}])
    [row] = _inspect(capsys, _cfg(tmp_path, model_dir, kto, objective="kto"))
    assert row["origin"].endswith("undesirable") and _trained(row).startswith("5")
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                 for i in range(3)])
    rows = _inspect(capsys, _cfg(tmp_path, model_dir, prompts, objective="grpo", rl={"max_new_tokens": 16}), n=2)
    assert len(rows) == 2 and not any(any(r["loss"]) for r in rows)  # completions are sampled, not given
    text = "".join(rows[0]["tokens"])
    assert "What is 0 + 0?" in text and text.endswith("<|im_start|>assistant\n")

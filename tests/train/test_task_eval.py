"""Learning vs forgetting recorded by a training run that declares eval.target / eval.source tasks."""

import json

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.config import load_config
from tunelab.train.launch import train


def _task(tmp_path, name, rows, fmt):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nkind: perplexity\ndata: {data.name}\nformat: {fmt}\nmax_length: 64\n")
    return str(path)


def test_run_records_learning_and_forgetting(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer)
    rows = alpaca_rows(24)
    target = _task(tmp_path, "target_loss", rows[:6], "alpaca")
    source = _task(tmp_path, "source_loss", [{"text": "The quick brown fox jumps over the lazy dog. " * 3}] * 3, "text")
    data = write_jsonl(tmp_path / "d.jsonl", rows)

    def run(out):
        cfg = write_config(tmp_path / f"{out}.yaml", output_dir=str(tmp_path / out), method="lora",
                           model={"name": str(model_dir)}, data={"train": str(data), "max_length": 64},
                           lora={"r": 8}, train={"max_steps": 8, "batch_size": 4, "lr": 2e-2, "eval_every": 4},
                           samples={"n_heldout": 0},
                           eval={"target": [target], "source": [source], "during_training": True})
        return json.loads((train(load_config(cfg)) / "results.json").read_text())

    res = run("a")
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    during = [r for r in rows if "target_loss/loss" in r]
    assert [r["step"] for r in during] == [4, 8]  # the target task's curve is in the log
    base, final = res["eval"]["base"], res["eval"]["final"]
    assert set(base) == {"target_loss", "source_loss"}
    assert final["target_loss"]["loss"] < base["target_loss"]["loss"]
    assert res["learning_score"] > 0  # trained on the target distribution: its loss fell
    expected = (base["target_loss"]["loss"] - final["target_loss"]["loss"]) / base["target_loss"]["loss"]
    assert abs(res["learning_score"] - expected) < 1e-9
    assert "source_loss" in res["forgetting"] and isinstance(res["forgetting_score"], float)
    # a second run with the same base model reuses the cached base evaluation
    res2 = run("b")
    assert res["eval"]["base_cached"] is False and res2["eval"]["base_cached"] is True
    assert res2["eval"]["base"]["target_loss"] == base["target_loss"]


def test_preference_run_records_learning_and_forgetting(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer)
    pairs = [{"prompt": f"{i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(12)]
    data = write_jsonl(tmp_path / "p.jsonl", pairs)
    source = _task(tmp_path, "source_loss", [{"text": "The quick brown fox jumps over the lazy dog."}] * 2, "text")
    cfg = write_config(tmp_path / "dpo.yaml", output_dir=str(tmp_path / "dpo"), method="lora", objective="dpo",
                       model={"name": str(model_dir)}, data={"train": str(data), "max_length": 64},
                       lora={"r": 4}, train={"max_steps": 2, "batch_size": 2, "lr": 1e-2},
                       samples={"n_heldout": 0}, eval={"target": [source], "source": [source]})
    res = json.loads((train(load_config(cfg)) / "results.json").read_text())
    assert set(res["eval"]["base"]) == {"source_loss"}
    assert isinstance(res["learning_score"], float) and res["forgetting_score"] == -res["learning_score"]

"""Preference objectives through the one loop: DPO raises the margin, the reward model separates its pairs,
every objective trains with LoRA and with full finetuning, and pipelines chain and resume stage by stage."""

import json

import pytest
import torch
from pref_helpers import pair_rows

from tunelab.adapters.base import get_method
from tunelab.objectives import load_run_config, run_config_schema
from tunelab.data.preference import encode_pairs, to_pair
from tunelab.data.sources import Record
from tunelab.data.templates import get_template
from tunelab.objectives.pairwise import evaluate_pairs
from tunelab.train.loop import fit
from tunelab.data.kinds import data_kind
from tunelab.train.launch import train


def _cfg(tmp_path, tiny_dir, data, **over):
    raw = {"output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_dir)},
           "data": {"train": str(data), "max_length": 64, "eval_fraction": 0.2},
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3}, "samples": {"n_heldout": 0}}
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and k in raw else v
    return run_config_schema().model_validate(raw)


def _examples(tokenizer, n=8):
    tmpl = get_template("chatml", tokenizer)
    return encode_pairs(tokenizer, [to_pair(Record(r, f"f:{i}")) for i, r in enumerate(pair_rows(n))], tmpl)[0]


def _fit(model, objective, examples, tokenizer, tmp_path, steps=8, lr=5e-3, **cfg):
    rc = run_config_schema().model_validate({"train": {"max_steps": steps, "batch_size": 4, "lr": lr, "warmup_steps": 0,
                                             "scheduler": "constant", **cfg}})
    fit(model, objective, data_kind("pairs").batches(examples, rc, tokenizer.pad_token_id), rc.train, tmp_path, resume=False)


def test_dpo_raises_the_margin(tiny, tokenizer, tmp_path):
    from tunelab.objectives.dpo import DPO
    from tunelab.objectives.reference import Reference

    model = tiny("llama")
    get_method("lora").wrap(model, {"r": 8, "alpha": 16})
    exs = _examples(tokenizer)
    obj = DPO(reference=Reference(model), chunk_size=64)
    before = evaluate_pairs(model, obj, exs, tokenizer.pad_token_id)
    _fit(model, obj, exs, tokenizer, tmp_path)
    after = evaluate_pairs(model, obj, exs, tokenizer.pad_token_id)
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at the start
    assert after["reward_margin"] > 0.5 and after["pref_accuracy"] == 1.0
    assert after["logp_margin"] > before["logp_margin"] and after["loss"] < before["loss"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_chosen", "reward_rejected", "reward_margin", "pref_accuracy", "kl_ref", "logp_chosen",
            "logp_rejected"} <= set(rows[-1])


def test_reward_model_separates_its_pairs(tiny, tokenizer, tmp_path):
    from tunelab.objectives.reward import RewardModelObjective, add_reward_head, pairwise_accuracy

    model = tiny("llama")
    add_reward_head(model)
    exs = _examples(tokenizer)
    before = pairwise_accuracy(model, exs, tokenizer.pad_token_id)
    _fit(model, RewardModelObjective(center_rewards=0.01), exs, tokenizer, tmp_path, steps=10, lr=1e-3)
    after = pairwise_accuracy(model, exs, tokenizer.pad_token_id)
    assert after["accuracy"] == 1.0 and after["margin"] > max(before["margin"], 0) + 0.5


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo", "kto", "reward"])
def test_every_objective_trains_through_the_run(objective, method, tiny_dir, pairs_file, unpaired_file, tmp_path):
    data = unpaired_file if objective == "kto" else pairs_file
    own = {"loss": "ipo"} if (objective, method) == ("dpo", "full") else \
        {"sft_weight": 0.5} if objective in ("dpo", "simpo", "orpo") else {}  # kto, reward: no NLL term
    cfg = _cfg(tmp_path, tiny_dir, data, objective=objective, method=method, **{objective: own},
               reference={"precompute": objective == "kto" and method == "full"})
    out = train(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 2 and res["objective"] == objective
    assert set(res["after"]) == {"train", "eval"} and res["after"]["eval"]
    if objective != "kto":
        assert "pref_accuracy" in res["after"]["eval"]
        assert objective == "reward" or "logp_margin" in res["after"]["train"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert (out / ("model" if method == "full" else "adapter")).exists()
    if cfg.reference.precompute:
        assert (out / "reference_logps.safetensors").exists()
    if objective == "reward":
        from tunelab.objectives.reward import load_reward_model

        rm = load_reward_model(out)
        acc = rm.accuracy(str(pairs_file))
        assert acc["n_pairs"] == 10 and 0.0 <= acc["accuracy"] <= 1.0
        assert isinstance(rm.score("Question number 1: is 1 a number?", "Yes, 1 is a number."), float)


def test_pipeline_chains_and_resumes(tiny_dir, pairs_file, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, tiny_dir, pairs_file, stages=[
        {"name": "sft", "objective": "sft", "data": {"packing": False, "columns": {"response": "chosen"}}},
        {"name": "dpo", "objective": "dpo", "train": {"lr": 1e-4}}])
    root = train(cfg)
    assert (root / "sft" / "merged" / "config.json").exists()
    dpo_cfg = load_run_config(root / "dpo" / "config.yaml")
    assert dpo_cfg.model.name == str(root / "sft" / "merged") and dpo_cfg.train.lr == 1e-4
    assert json.loads((root / "dpo" / "results.json").read_text())["steps"] == 2
    import tunelab.train.run as run_mod

    calls = []
    monkeypatch.setattr(run_mod, "run", lambda c, *a, **k: calls.append(c))
    from tunelab.train.pipeline import run_pipeline

    run_pipeline(cfg)  # both stages finished: nothing reruns
    assert calls == []


def test_pipeline_validates_every_stage_first(tiny_dir, pairs_file, tmp_path):
    from tunelab.errors import TunelabError

    cfg = _cfg(tmp_path, tiny_dir, pairs_file, stages=[{"name": "sft", "objective": "sft"},
                                                        {"name": "dpo", "objective": "dpo", "train": {"lrr": 1}}])
    with pytest.raises(TunelabError, match=r"stages\[1\] \(dpo\): train.lrr: unknown key"):
        train(cfg)
    assert not (tmp_path / "run" / "sft").exists()

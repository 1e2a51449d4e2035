"""The Llama-3-style post-training pipeline in one config (SFT → rejection sampling → reward model → PPO with the
reward model → DPO) on a tiny model: each stage starts from the previous policy stage's weights, PPO scores with
the reward model trained two stages before (``${PIPELINE_DIR}``), a stage killed mid-training resumes from its
checkpoint while finished stages are skipped, and one report holds every stage's learning and forgetting."""

import json

import pytest

import tunelab.train.loop as loop_mod
import tunelab.train.pipeline as pipeline_mod
from tests.helpers import save_tiny_model, write_config, write_jsonl
from tunelab.objectives import load_run_config
from tunelab.lab.report import report_main
from tunelab.lab.results import collect
from tunelab.train.launch import train

STAGES = ["sft", "rs", "rm", "ppo", "dpo"]


@pytest.fixture
def pipeline_cfg(tmp_path, tokenizer):
    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    qs = [f"Say something about {w}." for w in "abcdefghijkl"]
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": q, "completion": f"{q[-2]} is a letter."} for q in qs])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q, "answer": "x"} for q in qs])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": f"{q[-2]} is a letter.", "rejected": "No."}
                                                  for q in qs])
    for name, text in (("target", "Say something about a. a is a letter. "), ("source", "The sea was calm. ")):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": text * 3}, {"text": text * 2}])
        (tmp_path / f"{name}.yaml").write_text(f"kind: perplexity\ndata: {name}.jsonl\nformat: text\n")
    rl = {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8, "temperature": 0.7, "eval_prompts": 2,
          "rewards": [{"name": "length_penalty", "target": 4}]}
    return write_config(
        tmp_path / "pipeline.yaml", output_dir=str(tmp_path / "pipe"), method="full", model={"name": str(model)},
        data={"max_length": 64, "eval_fraction": 0.25, "packing": False},
        train={"max_steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0},
        samples={"n_heldout": 0}, eval={"target": [str(tmp_path / "target.yaml")], "source": [str(tmp_path / "source.yaml")]},
        stages=[
            {"name": "sft", "objective": "sft", "data": {"train": str(sft)}},
            {"name": "rs", "objective": "rejection_sampling", "data": {"train": str(prompts)}, "rl": rl},
            {"name": "rm", "objective": "reward", "data": {"train": str(pairs)}},
            {"name": "ppo", "objective": "ppo", "data": {"train": str(prompts)},
             "train": {"max_steps": 4, "save_every": 1},
             "ppo": {"beta": 0.05},
             "rl": {**rl, "rewards": [{"name": "reward_model", "run_dir": "${PIPELINE_DIR}/rm"}]}},
            {"name": "dpo", "objective": "dpo", "data": {"train": str(pairs)}},
        ])


def test_five_stages_chain_resume_and_report(pipeline_cfg, tmp_path, monkeypatch):
    cfg = load_run_config(pipeline_cfg)
    root = tmp_path / "pipe"
    original_run = pipeline_mod.single_run.run
    started = []

    def killed_in_ppo(scfg, stop_after=None):
        started.append(scfg.output_dir.split("/")[-1])
        if started[-1] == "ppo":
            original_run(scfg, stop_after=2)  # 2 of 4 steps, checkpoints at 1 and 2, then the process "dies"
            raise KeyboardInterrupt
        return original_run(scfg)

    monkeypatch.setattr(pipeline_mod.single_run, "run", killed_in_ppo)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert started == ["sft", "rs", "rm", "ppo"]
    assert not (root / "ppo" / "results.json").exists() and (root / "ppo" / "checkpoints" / "step-000002").exists()
    assert not (root / "results.json").exists()

    # the rerun: finished stages skipped, ppo resumed from its step-2 checkpoint, dpo trained
    started.clear()
    loaded = []
    original_load = loop_mod.load_checkpoint
    monkeypatch.setattr(loop_mod, "load_checkpoint", lambda path, *a, **k: (loaded.append(path.name),
                                                                           original_load(path, *a, **k))[1])
    monkeypatch.setattr(pipeline_mod.single_run, "run", lambda scfg: (started.append(scfg.output_dir.split("/")[-1]),
                                                                      original_run(scfg))[1])
    train(cfg)
    assert started == ["ppo", "dpo"] and loaded == ["step-000002"]
    ppo_steps = [json.loads(line)["step"] for line in (root / "ppo" / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)]
    assert ppo_steps == [1, 2, 3, 4]

    # each stage starts from the previous policy stage's weights (the reward model is not a policy)
    src = {n: load_run_config(root / n / "config.yaml").model.name for n in STAGES}
    assert src["sft"].endswith("tiny")
    assert src["rs"] == str(root / "sft" / "model")
    assert src["rm"] == src["ppo"] == str(root / "rs" / "model") and src["dpo"] == str(root / "ppo" / "model")
    assert load_run_config(root / "ppo" / "config.yaml").rl.rewards[0]["run_dir"] == str(root / "rm")
    ppo = json.loads((root / "ppo" / "results.json").read_text())
    assert "reward_before" in ppo and "reward_after" in ppo

    # the pipeline's own results.json: one row per stage, and learning/forgetting against the starting model
    summary = json.loads((root / "results.json").read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert [s["objective"] for s in summary["stages"]] == ["sft", "rejection_sampling", "reward", "ppo", "dpo"]
    sft, dpo = (json.loads((root / n / "results.json").read_text()) for n in ("sft", "dpo"))
    assert summary["eval"]["base"] == sft["eval"]["base"] and summary["eval"]["final"] == dpo["eval"]["final"]
    base, final = sft["eval"]["base"]["target"]["loss"], dpo["eval"]["final"]["target"]["loss"]
    assert summary["learning_score"] == pytest.approx((base - final) / base)

    # one report over the pipeline folder: a row per stage, each with its own learning and forgetting
    runs = collect([root])
    assert [r.label for r in runs] == [f"pipe/{n}" for n in STAGES]
    policy = [r for r in runs if r.results.get("objective") != "reward"]
    assert all(r.results["learning_score"] is not None and r.results["forgetting_score"] is not None for r in policy)
    assert report_main([str(root)], str(tmp_path / "report")) == 0
    assert "pipe/ppo" in (tmp_path / "report" / "results.md").read_text()

    # everything finished: a rerun trains nothing
    started.clear()
    train(cfg)
    assert started == []

"""Smoke test of the DPO-vs-PPO study (examples/studies/dpo_vs_ppo.yaml): every variant, as the sweep resolves
it, trains for one step on a tiny model through `tunelab compare`'s own runner — the fixed-pair files the study
needs exist, the two-stage variant runs as a pipeline, and the report reads every variant. The study itself is
not run here (it is hours of CPU)."""

import copy
import json
from pathlib import Path

from tests.helpers import save_tiny_model
from tunelab.lab.compare import run_sweep
from tunelab.lab.sweep import load_sweep

STUDY = Path(__file__).resolve().parents[2] / "examples" / "studies" / "dpo_vs_ppo.yaml"
VARIANTS = ["dpo_ood", "dpo_in_distribution", "sft_then_dpo_ood", "online_dpo", "ppo", "ppo_no_adv_norm",
            "ppo_small_batch", "ppo_no_ema", "grpo"]


def _tiny(raw: dict, model: str) -> dict:
    """The variant at smoke size: the tiny model, one step, short completions, one item per task."""
    raw = copy.deepcopy(raw)
    raw["model"]["name"] = model
    raw["train"].update(max_steps=1, eval_every=None, save_every=None)
    raw["rl"].update(max_new_tokens=8, eval_prompts=1)
    raw.setdefault("pref", {})["probe"] = 4
    raw["data"].update(limit=24, eval_max=4)
    raw["eval"]["limit"] = 1
    raw["samples"]["n_heldout"] = 0
    for st in raw.get("stages", []):
        st["train"]["max_steps"] = 1
        st["data"]["eval_max"] = 4
    return raw


def test_every_variant_runs_one_step(tmp_path, tokenizer, monkeypatch):
    model = str(save_tiny_model(tmp_path / "tiny", tokenizer))
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(STUDY)
    assert sweep.seeds == [0, 1, 2] and [v.name for v in sweep.variants] == [n for n in VARIANTS for _ in range(3)]
    sweep.variants = [v for v in sweep.variants if v.seed == 0]  # one seed here (tests/lab/test_study_sizes.py: 2)
    sweep.match = []  # one step each is not the study's budget (the bundled budgets: test_bundled_studies_validate)
    assert [v.name for v in sweep.variants] == VARIANTS
    for v in sweep.variants:
        v.raw = _tiny(v.raw, model)
        data = [v.raw["data"]["train"]] + [st["data"]["train"] for st in v.raw.get("stages", [])]
        assert all(Path(d).exists() for d in data), data  # scripts/build_arith_pref_data.py output is bundled
    outcomes = run_sweep(sweep)
    assert [(o.variant, o.status, o.error) for o in outcomes] == [(n, "done", None) for n in VARIANTS]
    runs = Path(sweep.output_dir) / "runs"
    for name in VARIANTS:
        res = json.loads((runs / name / "seed-0" / "results.json").read_text())
        assert res["steps"] == (2 if name == "sft_then_dpo_ood" else 1)
        assert res["learning_score"] is not None or res["eval"]["base"]["arith"]["exact_match"] == 0
        if name != "sft_then_dpo_ood":  # what a run sampled is what its config asked for (train/accounting.py)
            from tunelab.objectives import load_run_config as load_config
            from tunelab.train.accounting import configured

            want = configured(load_config(runs / name / "seed-0" / "config.yaml"))
            assert res["budget"]["completions_sampled"] == want["completions_sampled"], name
            assert (res["budget"]["completions_sampled"] > 0) == (name in ("online_dpo", "grpo") or "ppo" in name)
            assert res["budget"]["tokens_sampled"] <= want["tokens_sampled"] and res["budget"]["steps"] == 1
    pipe = json.loads((runs / "sft_then_dpo_ood" / "seed-0" / "results.json").read_text())
    assert [s["name"] for s in pipe["stages"]] == ["sft", "dpo"]
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((runs / "ppo" / "seed-0" / "config.yaml").read_text())))
    assert cfg["rl"]["prompts_per_step"] == 16 and cfg["reference"]["sync_every"] == 1
    assert (Path(sweep.output_dir) / "report" / "index.html").exists()

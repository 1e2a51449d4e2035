"""The five bundled studies at test size: each runs its first claim's two variants (and checks every claim between
them), on a tiny random model, at 2 seeds and one optimizer step, through `tunelab compare`'s own runner — and
its report carries a claims table computed by `lab.stats` from the runs' per-item scores. What is checked is the
machinery (every claim is computed over 2 seeds and the same items, nothing is "not run"), not the verdicts: a
random tiny model has none to give.

The full studies (3 seeds, SmolLM2-135M) are hours of CPU: `tunelab compare examples/studies/<name>.yaml`."""

import copy
from pathlib import Path

import pytest

from tests.helpers import save_tiny_model
from tunelab.lab.claims import evaluate_claims
from tunelab.lab.compare import run_sweep
from tunelab.lab.results import collect
from tunelab.lab.study import claim_text
from tunelab.lab.sweep import load_sweep

STUDIES = Path(__file__).resolve().parents[2] / "examples" / "studies"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", tokenizer))


def shrink(raw: dict, model: str) -> dict:
    """A variant at test size: the tiny model, one step, short generations, two items per task."""
    raw = copy.deepcopy(raw)
    parts = [raw] + [st for st in raw.get("stages") or []]
    for part in parts:
        train = part.setdefault("train", {})
        train.update(max_steps=1, eval_every=None, save_every=None, batch_size=min(train.get("batch_size", 2), 4),
                     grad_accum=1)
        data = part.setdefault("data", {})
        data.update(limit=24, eval_max=2, max_length=128)
        data.pop("eval", None)  # held-out loss on 2 training rows, not the study's held-out file
    raw["model"]["name"] = model
    raw.setdefault("eval", {}).update(limit=2, during_training=False)
    raw["samples"] = {"n_heldout": 0, "prompts": [], "at_eval": False}
    if "rl" in raw:
        raw["rl"].update(max_new_tokens=8, eval_prompts=1,
                         prompts_per_step=min(raw["rl"].get("prompts_per_step", 2), 4))
    raw.setdefault("pref", {})["probe"] = 4
    return raw


@pytest.mark.parametrize("name", ["lora_vs_full", "mora_vs_lora", "masking", "dora_vs_lora", "dpo_vs_ppo"])
def test_study_at_test_size(name, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    sweep = load_sweep(STUDIES / f"{name}.yaml")
    assert sweep.seeds == [0, 1, 2] and sweep.claims and sweep.match  # the bundled study: 3 seeds, claims, match
    # test size: the first claim's two variants, and every claim between them (tests/lab/test_dpo_vs_ppo_study.py
    # runs each DPO-vs-PPO variant once; test_bundled_studies_validate resolves every variant of every study)
    pair = {sweep.claims[0].better, sweep.claims[0].than}
    sweep.claims = [c for c in sweep.claims if {c.better, c.than} <= pair]
    sweep.variants = [v for v in sweep.variants if v.name in pair and v.seed in (0, 1)]
    sweep.seeds, sweep.match = [0, 1], []  # one step is not the study's budget (that is test_bundled_studies_validate)
    for v in sweep.variants:
        v.raw = shrink(v.raw, tiny_model_dir)
    outcomes = run_sweep(sweep)
    assert [o.status for o in outcomes] == ["done"] * len(outcomes), [(o.name, o.error) for o in outcomes]
    rows = evaluate_claims(collect([sweep.output_dir]), sweep.claims, n_resamples=2000)
    for row in rows:
        assert row["outcome"] in ("matched", "contradicted", "inconclusive"), row
        assert row["n_seeds"] == 2 and row["n_items"] >= 2 and row["low"] <= row["diff"] <= row["high"]
        assert row["p_holm"] >= row["p"]
    md = (sweep.report_dir / "results.md").read_text()
    assert "| claim (paper's direction) |" in md and "Provenance: tunelab" in md
    assert all(claim_text(r) in md for r in rows)

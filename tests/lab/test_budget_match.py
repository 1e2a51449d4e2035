"""A study's budgets: ``match: [flops]`` checked before training from each variant's config (full vs LoRA), and the
study's wall time summed over its `tunelab compare` invocations and shown in the report."""

import json

import pytest
import yaml

from tests.helpers import alpaca_rows, save_tiny_model, write_jsonl
from tunelab.cli import main

# the tiny llama of tests/helpers.save_tiny_model: hidden 64, 2 layers, 4 heads of 16 (2 key/value heads),
# intermediate 128, vocab 49,152, untied head
N = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 2 * 49152 * 64 + 64  # = 6,365,504
# LoRA r=2 on every linear layer: r·(d_in + d_out) for q, k, v, o, gate, up, down, in each of 2 layers
N_LORA = 2 * 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))  # = 4,096
TOKENS_PER_STEP = 2 * 64  # batch_size × max_length: the configured upper bound


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("budget")
    data = write_jsonl(tmp / "d.jsonl", alpaca_rows(12))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_CACHE", str(tmp / "cache"))
        yield save_tiny_model(tmp / "tiny", tokenizer), data


def write_study(path, model, data, out, variants, **extra):
    study = {"name": "budget-study", "output_dir": str(out),
             "base": {"model": {"name": str(model)}, "lora": {"r": 2},
                      "data": {"train": str(data), "max_length": 64, "eval_fraction": 0.25},
                      "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "eval_every": None, "save_every": None},
                      "samples": {"n_heldout": 0, "at_eval": False}},
             "variants": variants, **extra}
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_match_flops_refuses_full_vs_lora_at_equal_tokens(assets, tmp_path, capsys):
    model, data = assets
    assert N == 6_365_504 and N_LORA == 4_096
    variants = [{"name": "full", "overrides": {"method": "full"}}, {"name": "lora", "overrides": {"method": "lora"}}]
    path = write_study(tmp_path / "s.yaml", model, data, tmp_path / "out", variants, match=["flops"])
    assert main(["compare", str(path)]) == 2  # refused before anything trains
    err = capsys.readouterr().err.strip()
    full = 6 * N * 2 * TOKENS_PER_STEP  # 6·N per token
    lora = (4 * N + 6 * N_LORA) * 2 * TOKENS_PER_STEP  # 4·N_base + 6·N_trainable per token
    assert f"{full:.3g}" == "9.78e+09" and f"{lora:.3g}" == "6.52e+09"
    assert err.splitlines() == [f"error: {path}: match: flops: configured budgets differ by more than 5% — "
                                f"'lora' {lora:.3g} vs 'full' {full:.3g}"]
    assert not (tmp_path / "out").exists()  # refused: nothing written, not even the variants' configs


def test_match_flops_accepts_steps_that_even_out_the_flops(assets, tmp_path, capsys):
    model, data = assets
    # LoRA costs ≈ 2/3 of full finetuning per token: 3 LoRA steps ≈ 2 full ones (within 0.1 %)
    variants = [{"name": "full", "overrides": {"method": "full", "train.max_steps": 2}},
                {"name": "lora", "overrides": {"method": "lora", "train.max_steps": 3}}]
    path = write_study(tmp_path / "s.yaml", model, data, tmp_path / "out", variants, match=["flops", "flops_train"])
    assert main(["compare", str(path), "--dry-run"]) == 0
    plan = capsys.readouterr().err
    assert "configured budgets differ" not in plan
    assert "≤ FLOPs" in plan and f"{6 * N * 2 * TOKENS_PER_STEP:.3g}" in plan  # the plan shows each variant's
    assert not (tmp_path / "out").exists()
    from tunelab.lab.claims import match_problem

    budgets = {"full": {"flops": 6 * N * 2 * TOKENS_PER_STEP},
               "lora": {"flops": (4 * N + 6 * N_LORA) * 3 * TOKENS_PER_STEP}}
    assert match_problem(budgets, ["flops"]) is None
    assert budgets["lora"]["flops"] / budgets["full"]["flops"] == pytest.approx(1.00097, abs=1e-5)


def test_study_wall_time_adds_up_over_compare_invocations(assets, tmp_path):
    model, data = assets
    variants = [{"name": "a", "overrides": {"train.lr": 1e-3}}, {"name": "b", "overrides": {"train.lr": 2e-3}}]
    path = write_study(tmp_path / "s.yaml", model, data, tmp_path / "out", variants, match=["flops"])
    assert main(["compare", str(path), "--only", "a"]) == 0  # the study in two parts
    first = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert first["invocations"] == 1 and first["wall_seconds"] > 0
    assert main(["compare", str(path)]) == 0
    state = json.loads((tmp_path / "out" / "sweep.json").read_text())
    run_b = json.loads((tmp_path / "out" / "runs" / "b" / "results.json").read_text())["budget"]
    assert state["invocations"] == 2
    assert state["wall_seconds"] > first["wall_seconds"] + run_b["wall_seconds"]  # the second part included
    assert state["configured_budgets"]["a"]["flops"] == (4 * N + 6 * N_LORA) * 2 * TOKENS_PER_STEP
    md = (tmp_path / "out" / "report" / "results.md").read_text()
    minutes = state["wall_seconds"] / 60
    assert f"tunelab compare ran {minutes:.1f} min in 2 invocations" in md and "Σ runs" in md
    assert "flops (configured) |" in md and "| invocations |" in md
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert "in 2 invocations" in page


def test_a_declared_outside_budget_counts_in_the_flops_total(assets, tmp_path):
    """A variant's ``budget: {flops_sampling: …}`` (compute spent outside its run) joins its FLOPs total."""
    from tunelab.lab.claims import match_problem
    from tunelab.lab.compare import configured_budgets
    from tunelab.lab.sweep import load_sweep, resolve

    model, data = assets
    full = 6 * N * 2 * TOKENS_PER_STEP
    lora = (4 * N + 6 * N_LORA) * 2 * TOKENS_PER_STEP
    variants = [{"name": "full", "overrides": {"method": "full"}},
                {"name": "lora", "overrides": {"method": "lora"}, "budget": {"flops_sampling": full - lora}}]
    path = write_study(tmp_path / "s.yaml", model, data, tmp_path / "out", variants, match=["flops"])
    sweep = load_sweep(str(path))
    budgets = configured_budgets(sweep, [resolve(sweep, v, write=False) for v in sweep.variants])
    assert budgets["lora"]["flops_sampling"] == full - lora and budgets["lora"]["flops"] == full
    assert match_problem(budgets, ["flops"]) is None


def test_a_bad_variant_of_a_matched_study_names_its_written_config(assets, tmp_path, capsys):
    """With `match:` the configs are written only after the check, yet a broken variant is still reported at the
    line of its written config file (which the user opens), not at a temporary copy."""
    model, data = assets
    variants = [{"name": "ok"}, {"name": "bad", "overrides": {"train.lrr": 1.0}}]
    path = write_study(tmp_path / "s.yaml", model, data, tmp_path / "out", variants, match=["steps"])
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    written = tmp_path / "out" / "configs" / "bad.yaml"
    assert len(err.splitlines()) == 1 and f"{written}:" in err and "lrr" in err and "dry run" not in err
    assert written.exists() and not (tmp_path / "out" / "runs").exists()

"""Options that moved from the shared `pref:` / `rl:` sections to their objective's own section are still read
from their old place — in a file, an override, a pipeline stage, a sweep axis, an old run's saved config.yaml —
with one deprecation line per old key and process."""

import sys
from pathlib import Path

import pytest

import tunelab.config as config_mod
from tunelab.errors import TunelabError
from tunelab.objectives import load_run_config, run_config_schema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import write_config  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    monkeypatch.setattr(config_mod, "NOTICES_SHOWN", set())


def _notices(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("deprecated:")]


def test_an_old_key_in_a_file_moves_with_one_notice(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", objective="dpo", pref={"beta": 0.2, "loss": "ipo", "probe": 8})
    cfg = load_run_config(path)
    assert (cfg.dpo.beta, cfg.dpo.loss, cfg.pref.probe) == (0.2, "ipo", 8)
    # the old key applied to whichever objective ran: every section that took it over reads it
    assert cfg.simpo.beta == cfg.orpo.beta == cfg.kto.beta == cfg.online_dpo.beta == 0.2
    assert _notices(capsys) == [
        "deprecated: pref.beta is now dpo.beta (each objective has its own section; the old key still works)",
        "deprecated: pref.loss is now dpo.loss (each objective has its own section; the old key still works)"]
    load_run_config(path)
    assert _notices(capsys) == []  # once per process


@pytest.mark.parametrize("old,new,value", [
    ("rl.beta", "grpo.beta", 0.04), ("rl.epsilon", "grpo.epsilon", 0.3), ("rl.epsilon_high", "grpo.epsilon_high", 0.28),
    ("rl.loss_agg", "grpo.loss_agg", "constant"), ("rl.kl_estimator", "grpo.kl_estimator", "k1"),
    ("rl.advantage", "grpo.advantage", "dr_grpo"), ("rl.share_prompts", "grpo.share_prompts", False),
    ("rl.beta", "ppo.beta", 0.05), ("rl.epsilon", "ppo.epsilon", 0.1), ("rl.beta", "rloo.beta", 0.01),
    ("rl.keep", "rejection_sampling.keep", "threshold"),
    ("rl.keep_threshold", "rejection_sampling.keep_threshold", -0.5),
    ("pref.sft_weight", "orpo.sft_weight", 0.5), ("pref.label_smoothing", "simpo.label_smoothing", 0.1),
    ("pref.gamma_beta_ratio", "simpo.gamma_beta_ratio", 0.3), ("pref.orpo_prompt_loss", "orpo.prompt_loss", False),
    ("pref.desirable_weight", "kto.desirable_weight", 1.3), ("pref.undesirable_weight", "kto.undesirable_weight", 0.7),
    ("pref.center_rewards", "reward.center_rewards", 0.01), ("pref.beta", "online_dpo.beta", 0.3)])
def test_every_moved_key_as_an_override(old, new, value, capsys):
    section = new.split(".")[0]
    cfg = load_run_config(None, [f"objective={section}", f"{old}={str(value).lower()}"])
    got = getattr(getattr(cfg, section), new.split(".")[1])
    assert got == value
    assert _notices(capsys) == [f"deprecated: {old} is now {new} (each objective has its own section; the old key "
                                "still works)"]


def test_a_bad_old_value_names_the_old_keys_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective: grpo\nrl:\n  group_size: 2\n  epsilon: 1.5\n")
    with pytest.raises(TunelabError) as e:
        load_run_config(path)
    assert str(e.value).startswith(f"{path}:4: grpo.epsilon: Input should be less than 1")
    with pytest.raises(TunelabError) as e:
        load_run_config(None, ["rl.epsilon=0"])
    assert str(e.value).startswith("override: grpo.epsilon:")


def test_the_new_key_wins_and_null_meant_the_default(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", objective="grpo", grpo={"beta": 0.1},
                        rl={"beta": 0.5, "advantage": None, "kl_estimator": None, "group_size": 2})
    cfg = load_run_config(path)
    assert (cfg.grpo.beta, cfg.grpo.advantage, cfg.grpo.kl_estimator, cfg.rl.group_size) == (0.1, None, "k3", 2)
    assert cfg.ppo.beta == 0.5 and cfg.ppo.kl_estimator == "k1"
    cfg = load_run_config(path, ["rl.beta=0.7"])  # an override wins over the file, whichever name it uses
    assert cfg.grpo.beta == cfg.ppo.beta == 0.7


def test_an_old_runs_saved_config_loads(tmp_path):
    """A config.yaml written before the move: every old field present, None where it meant a default."""
    old = {"objective": "ppo", "method": "lora",
           "pref": {"loss": "sigmoid", "beta": None, "label_smoothing": 0.0, "sft_weight": 0.0,
                    "gamma_beta_ratio": 0.5, "orpo_prompt_loss": True, "desirable_weight": 1.0,
                    "undesirable_weight": 1.0, "center_rewards": 0.0, "probe": 64},
           "rl": {"group_size": 4, "prompts_per_step": 2, "ppo_epochs": 1, "temperature": 1.0, "top_p": 1.0,
                  "max_new_tokens": 128, "stop": [], "rewards": [{"name": "exact_match"}], "advantage": None,
                  "beta": 0.05, "kl_estimator": None, "epsilon": 0.2, "epsilon_high": None,
                  "loss_agg": "token_mean", "share_prompts": True, "keep": "best", "keep_threshold": 1.0,
                  "eval_prompts": 16},
           "ppo": {"value_coef": 0.1, "gamma": 1.0}}
    cfg = load_run_config(write_config(tmp_path / "config.yaml", **old))
    assert (cfg.ppo.beta, cfg.ppo.kl_estimator, cfg.ppo.value_coef, cfg.dpo.beta, cfg.rl.group_size) == \
        (0.05, "k1", 0.1, 0.1, 4)


def test_stages_and_sweep_axes_move_too(tmp_path, capsys):
    from tunelab.lab.sweep import build_sweep, resolve, SweepSpec
    from tunelab.train.pipeline import resolve_stages

    path = write_config(tmp_path / "p.yaml", output_dir=str(tmp_path / "pipe"), stages=[
        {"name": "rs", "objective": "rejection_sampling", "rl": {"keep": "threshold", "group_size": 2}},
        {"name": "dpo", "objective": "dpo", "pref": {"beta": 0.25}}])
    stages = {name: scfg for name, scfg, _ in resolve_stages(load_run_config(path))}
    assert stages["rs"].rejection_sampling.keep == "threshold" and stages["rs"].rl.group_size == 2
    assert stages["dpo"].dpo.beta == 0.25
    spec = SweepSpec(base={"objective": "grpo"}, grid={"rl.beta": [0.0, 0.05], "pref.beta": [0.3]},
                     output_dir=str(tmp_path / "sweep"))
    sweep = build_sweep(spec, {}, None)
    cfgs = [resolve(sweep, v) for v in sweep.variants]
    assert [c.grpo.beta for c in cfgs] == [0.0, 0.05] and {c.dpo.beta for c in cfgs} == {0.3}
    assert [v.name for v in sweep.variants] == ["rl.beta=0,pref.beta=0.3", "rl.beta=0.05,pref.beta=0.3"]
    notices = _notices(capsys)
    assert len(notices) == len(set(notices)) == 3  # rl.keep, pref.beta, then the sweep's rl.beta (pref.beta: once)


def test_a_base_run_config_is_completed_by_the_schema():
    from tunelab.config import RunConfig
    from tunelab.objectives import validate_run_config

    base = RunConfig(objective="grpo", rl={"group_size": 2})
    cfg = validate_run_config(base)
    assert isinstance(cfg, run_config_schema()) and cfg.rl.group_size == 2 and cfg.grpo.beta == 0.0
    assert validate_run_config(cfg) is cfg

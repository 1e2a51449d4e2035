"""Every example config in examples/ validates (schema, overrides, reward specs) — they are documentation."""

from pathlib import Path

import pytest

from tunelab.objectives import load_run_config
from tunelab.objectives import objective_class

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_validates(path):
    from tunelab import rl  # noqa: F401  (registers the prompts data kind)
    from tunelab.data.kinds import data_kind
    from tunelab.train.pipeline import resolve_stages

    top = load_run_config(path)
    assert top.output_dir.startswith("runs/")  # examples write under runs/, which .gitignore covers
    # a pipeline: every stage as it will run (`${PIPELINE_DIR}`, `${STAGE:name}` resolved, references checked);
    # otherwise the config itself
    stages = resolve_stages(top, path) if top.stages else [(top.output_dir, top, None)]
    for stage in stages:
        cfg, generate = stage[1], getattr(stage, "generate", None)
        cls = objective_class(cfg.objective)
        assert data_kind(cls.data_kind).name == cls.data_kind  # the objective's data kind exists
        # the bundled data they name is shipped; an earlier stage of the same pipeline writes the rest
        assert cfg.data.train.startswith(top.output_dir) or (ROOT / cfg.data.train).is_file(), cfg.data.train
        if cls.data_kind == "prompts" or generate is not None:
            from tunelab.rl.rewards import build_rewards

            # a reward model trained by an earlier stage of the same pipeline does not exist yet
            specs = [r for r in cfg.rl.rewards if not str(r.get("run_dir", "")).startswith(top.output_dir)]
            rewards = build_rewards(specs, allow_code_execution=cfg.eval.allow_code_execution)
            assert len(rewards.entries) == len(specs) >= 1


def test_examples_and_studies_use_the_current_option_names(monkeypatch, capsys):
    """No shipped config needs a deprecation notice: they teach each objective's own section (dpo:, grpo:, …)."""
    import tunelab.config as config_mod
    from tunelab.lab.sweep import load_sweep
    from tunelab.objectives import validate_run_config

    monkeypatch.setattr(config_mod, "NOTICES_SHOWN", set())
    for path in EXAMPLES:
        load_run_config(path)
    for path in sorted((ROOT / "examples" / "studies").glob("*.yaml")):
        for v in load_sweep(path).variants:
            validate_run_config(v.raw)
    assert "deprecated:" not in capsys.readouterr().err


def test_every_shipped_online_rl_example_has_a_task_the_demo_model_can_score_on():
    """The demo model (SmolLM2-135M) scores 0 on every GSM completion, so an online RL example on GSM has no prompt
    group whose completions disagree: zero gradient from first step to last. The shipped ones use the bundled
    arithmetic prompts (~1 in 8 right at temperature 0.7) with groups of 8, as the grpo_arith run that learns."""
    for path in EXAMPLES:
        cfg = load_run_config(path)
        if cfg.stages or objective_class(cfg.objective).data_kind != "prompts":
            continue
        assert cfg.data.train.endswith("arith_rl.jsonl"), path.name
        if cfg.objective != "ppo":  # PPO's baseline is its value model, not the group: any group size learns
            assert cfg.rl.group_size >= 8 and cfg.rl.temperature <= 0.7, path.name
        assert all(r.get("extract") == "last_number" for r in cfg.rl.rewards if r["name"] == "exact_match"), path.name

"""Every example config in examples/ validates (schema, overrides, reward specs) — they are documentation."""

from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.objectives import objective_class

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_validates(path):
    from tunelab import rl  # noqa: F401  (registers the prompts data kind)
    from tunelab.data.kinds import data_kind

    cfg = load_config(path)
    cls = objective_class(cfg.objective)
    assert data_kind(cls.data_kind).name == cls.data_kind  # the objective's data kind exists
    assert cfg.output_dir.startswith("runs/")  # examples write under runs/, which .gitignore covers
    assert Path(cfg.data.train).is_file(), cfg.data.train  # the bundled data they name is shipped
    if cls.data_kind == "prompts":
        from tunelab.rl.rewards import build_rewards

        rewards = build_rewards(cfg.rl.rewards, allow_code_execution=cfg.eval.allow_code_execution)
        assert len(rewards.entries) == len(cfg.rl.rewards) >= 1

"""Every example config in examples/ validates (schema, overrides, reward specs) — they are documentation."""

from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.objectives import objective_class

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_validates(path):
    cfg = load_config(path)
    cls = objective_class(cfg.objective)
    if cls.data_kind == "prompts":
        from tunelab.rl.rewards import build_rewards

        build_rewards(cfg.rl.rewards, allow_code_execution=cfg.eval.allow_code_execution)

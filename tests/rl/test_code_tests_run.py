"""A GRPO run rewarded by ``code_tests``: every step's metrics.jsonl row carries ``reward_hacking_attempts``
(the completions of that step the screen flagged), next to the code reward itself."""

import json
import math

import pytest

from tests.helpers import save_tiny_model, write_config, write_jsonl
from tunelab.config import load_config
from tunelab.eval.sandbox import probe
from tunelab.eval.tasks import load_task
from tunelab.train.launch import train


@pytest.mark.skipif(probe() is not None, reason=f"no OS sandbox here ({probe()}): code_tests is refused "
                    "(tests/eval/test_sandbox_escapes.py checks the refusal)")
def test_grpo_with_code_tests_logs_reward_hacking_attempts(tmp_path, tokenizer):
    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    problems = [r.data for r in load_task("humaneval").records(8)]
    data = write_jsonl(tmp_path / "code.jsonl", [{"prompt": p["prompt"], **p} for p in problems])
    cfg = write_config(tmp_path / "run.yaml", output_dir=str(tmp_path / "run"), method="full", objective="grpo",
                       model={"name": str(model)}, data={"train": str(data), "max_length": 512, "eval_fraction": 0.25},
                       train={"max_steps": 2, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0},
                       rl={"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 8, "temperature": 1.0,
                           "rewards": [{"name": "code_tests", "timeout": 5.0}], "eval_prompts": 2},
                       eval={"allow_code_execution": True}, samples={"n_heldout": 0})
    out = train(load_config(cfg))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["reward_hacking_attempts"] == 0  # a random tiny model writes no exits or introspection
        assert r["reward_code_tests"] == 0.0 and math.isfinite(r["loss"])

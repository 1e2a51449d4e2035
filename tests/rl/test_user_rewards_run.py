"""Your own reward function through `tunelab train`, as a new user writes it: a TRL-style `fn(completions,
**kwargs)` in `my_rewards.py` next to the config (run from another folder, no PYTHONPATH); a reward that hangs
is one line; a wrong signature is refused before anything is written; a run where every group scores the same
logs `zero_signal_groups` 1.0 and says once that it is not learning."""

import json

import pytest

from tests.helpers import save_tiny_model, write_config, write_jsonl
from tunelab.cli import main

REWARDS = '''
import threading

RELEASE = threading.Event()


def constant(completions, **kwargs):
    return [0.0] * len(completions)


def hang(completions, **kwargs):
    RELEASE.wait()
    return [0.0] * len(completions)


def wrong(a, b):
    return [0.0]
'''


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", tokenizer)


@pytest.fixture
def project(tmp_path, model, monkeypatch):
    """A config folder with its own reward module (unique name per test), run from a different working dir."""
    folder = tmp_path / "project"
    folder.mkdir()
    module = f"my_rewards_{tmp_path.name.replace('-', '_')}"
    (folder / f"{module}.py").write_text(REWARDS)
    data = write_jsonl(folder / "prompts.jsonl", [{"prompt": f"Say {w}.", "answer": "x"} for w in "abcdefgh"])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    def make(fn, steps=2, **rl):
        return write_config(folder / "run.yaml", output_dir=str(tmp_path / "run"), method="full", objective="grpo",
                            model={"name": str(model)}, data={"train": str(data), "max_length": 64},
                            train={"max_steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0},
                            rl={"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 6,
                                "rewards": [{"name": f"{module}:{fn}", **rl.pop("reward", {})}], "eval_prompts": 0,
                                **rl},
                            samples={"n_heldout": 0})
    return make, module, tmp_path / "run"


def test_trl_style_function_next_to_the_config_trains_and_no_signal_is_said(project, capsys):
    make, module, run = project
    assert main(["train", str(make("constant", steps=3, warn_no_signal_rounds=2))]) == 0
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["zero_signal_groups"] for r in train] == [1.0, 1.0, 1.0]
    assert all("truncated" in r and "round" in r and "epoch" not in r for r in train)  # a round is no epoch
    assert err.count("no learning signal for 2 rounds") == 1  # once, after 2 flat rounds, not again at round 3
    # the plain progress lines (no terminal here) carry the RL numbers
    assert "zero-signal 100%" in err and "round 3" in err


def test_a_reward_that_never_returns_is_one_line(project, capsys):
    make, module, run = project
    import importlib

    try:
        rc = main(["train", str(make("hang", reward={"call_timeout": 0.5}))])
    finally:
        importlib.import_module(module).RELEASE.set()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"error: reward '{module}:hang': did not return within 0.5 s")
    assert not any("Traceback" in line for line in err)


def test_a_wrong_signature_is_refused_before_anything_is_written(project, capsys):
    make, module, run = project
    assert main(["train", str(make("wrong"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected tunelab's fn(batch, **options)" in err[0] and "TRL's" in err[0]
    assert not run.exists()

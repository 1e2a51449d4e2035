"""Kill-and-resume soak: a training run in a child process is killed with SIGKILL — part-way through writing a
checkpoint file, just before a checkpoint's rename, right after a metrics row, or at a random moment — then
killed again after resuming, and finally resumed to the end. Its metrics (every non-timing value of every row)
must be bit-identical to an uninterrupted run, for an SFT, a DPO and an online-RL (GRPO) run.

The children are forked from the test process (torch and the model code already imported), so a kill costs a
fraction of a second, not an interpreter start. Kill points come from a seeded RNG and are printed on failure.
"""

import json
import multiprocessing
import os
import random
import signal
import time

import pytest

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.config import load_config
from tunelab.train.launch import train

REWARD = '''
def even_share(batch):
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in batch.completion_ids]
'''
EVENTS = ("file", "rename", "row")  # what a kill can land on (see _arm)


def _arm(event: str, nth: int) -> None:
    """In the child: SIGKILL this process at the `nth` event of kind `event` — a checkpoint file half-written,
    a finished temporary checkpoint about to be renamed into place, a metrics row just appended."""
    from tunelab.train import checkpoint, checkpoint_files, log

    seen = {e: 0 for e in EVENTS}

    def hit(kind):
        seen[kind] += 1
        return kind == event and seen[kind] == nth

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def writer(real):
        def write(tensors, path, *a, **k):
            if hit("file"):
                with open(path, "wb") as f:
                    f.write(b"\0" * 64)  # the first bytes of a file that never gets finished
                die()
            return real(tensors, path, *a, **k)
        return write

    checkpoint.save_file = writer(checkpoint.save_file)
    checkpoint_files.save_file = writer(checkpoint_files.save_file)
    real_rename, real_write = checkpoint.os.rename, log.MetricsLog.write

    def rename(src, dst, *a, **k):
        if str(src).rsplit("/", 1)[-1].startswith(".tmp-step-") and hit("rename"):
            die()
        return real_rename(src, dst, *a, **k)

    def write_row(self, row):
        real_write(self, row)
        if hit("row"):
            die()

    os.rename = rename
    log.MetricsLog.write = write_row


def _child(config, event, nth):
    if event != "timer":
        _arm(event, nth)
    train(load_config(config))


def _kill_mid_training(child, metrics, delay):
    """SIGKILL `child` `delay` seconds after it appended its first metrics row (it is training by then)."""
    start = metrics.stat().st_size if metrics.exists() else 0
    for _ in range(6000):
        if not child.is_alive() or (metrics.exists() and metrics.stat().st_size > start):
            break
        time.sleep(0.01)
    time.sleep(delay)
    child.kill()


def _rows(run_dir):
    timing = ("_per_s", "seconds")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in rows]


@pytest.fixture
def configs(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "soak_rewards.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path / "rewards"))
    sft = write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(24))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i} + {i}?", "chosen": f"{2 * i}.",
                                                    "rejected": f"{2 * i + 1}."} for i in range(24)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about {w}.", "answer": "x"}
                                                       for w in "abcdefghijkl"])
    common = {"model": {"name": str(model)}, "samples": {"n_heldout": 0}}
    train_opts = {"max_steps": 5, "batch_size": 4, "lr": 5e-3, "save_every": 1, "keep_last": 2}
    specs = {
        "sft": {"objective": "sft", "method": "lora", "lora": {"r": 4, "dropout": 0.1},
                "data": {"train": str(sft), "max_length": 64, "eval_max": 4}},
        "dpo": {"objective": "dpo", "method": "lora", "lora": {"r": 4},
                "data": {"train": str(pairs), "max_length": 64, "eval_max": 4}, "reference": {"sync_every": 2}},
        "grpo": {"objective": "grpo", "method": "full", "data": {"train": str(prompts), "max_length": 64,
                                                                  "eval_fraction": 0.25},
                 "rl": {"group_size": 4, "prompts_per_step": 2, "ppo_epochs": 2, "max_new_tokens": 6,
                        "temperature": 0.7, "rewards": [{"name": "soak_rewards:even_share"}], "eval_prompts": 1}},
    }

    def make(objective, name):
        lr = {"lr": 2e-3} if objective == "grpo" else {}
        return write_config(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name),
                            **common, train={**train_opts, **lr}, **specs[objective])
    return make


@pytest.mark.parametrize("objective", ["sft", "dpo", "grpo"])
def test_killed_again_and_again_resumes_onto_the_same_curve(configs, objective):
    whole = train(load_config(configs(objective, "whole")))
    killed = configs(objective, "killed")
    rng = random.Random(f"soak-{objective}")
    # 1: part-way through a checkpoint file while an earlier checkpoint exists (3-4 files per checkpoint);
    # 2: before a checkpoint's rename or after a metrics row, in the resumed run; 3: at a random moment
    kills = [("file", rng.randint(5, 11)), rng.choice([("rename", 1), ("row", rng.randint(1, 2))]),
             ("timer", rng.uniform(0.0, 0.4))]
    out = killed.parent / "killed"
    fork = multiprocessing.get_context("fork")
    for event, nth in kills:
        child = fork.Process(target=_child, args=(killed, event, nth))
        child.start()
        if event == "timer":
            _kill_mid_training(child, out / "metrics.jsonl", nth)
        child.join(timeout=120)
        # an armed kill always lands; a timed one may come after the run finished
        assert child.exitcode == -signal.SIGKILL or event == "timer" and child.exitcode == 0, (kills, event)
    if not (out / "results.json").exists():
        train(load_config(killed))
    assert _rows(out) == _rows(whole), kills
    assert not list((out / "checkpoints").glob(".tmp-*"))

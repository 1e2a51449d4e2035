"""No silent minute: every phase of a run says what it is doing (`console.phase`), the step display has an ETA that
works however long a step takes, and a run whose output is not a terminal (`> log 2>&1`, nohup, SLURM) prints one
plain line per logged step instead of one final bar line — also when only stdout is redirected (`> log`: the bar
stays on the terminal, the step lines go to the file; checked through a pseudo-terminal)."""

import io
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab import console as console_mod
from tunelab.cli import main
from tunelab.train.log import TrainDisplay, step_extra

ROOT = Path(__file__).resolve().parents[2]
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  loss \d+\.\d{4}  lr \S+  [\d,]+ tok/s.*"
                       r"  elapsed \d:\d\d:\d\d  eta \d:\d\d:\d\d$")


@pytest.fixture(scope="module")
def sft_config(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("display")
    model = save_tiny_model(root / "tiny", tokenizer)
    data = write_jsonl(root / "data.jsonl", alpaca_rows(24))
    task = root / "loss.yaml"
    task.write_text(f"kind: perplexity\ndata: {data}\nformat: alpaca\nmax_length: 64\nlimit: 4\n")

    def make(out: Path, steps=4, log_every=1):
        return write_config(out.parent / f"{out.name}.yaml", output_dir=str(out), method="lora",
                            model={"name": str(model)}, lora={"r": 4},
                            data={"train": str(data), "max_length": 64, "eval_fraction": 0.2},
                            train={"max_steps": steps, "batch_size": 2, "lr": 1e-3, "eval_every": 2,
                                   "log_every": log_every},
                            samples={"n_heldout": 1, "max_new_tokens": 4, "at_eval": True},
                            eval={"target": [str(task)]})
    return make


def test_every_phase_of_a_run_announces_itself(sft_config, tmp_path, capsys):
    assert main(["train", str(sft_config(tmp_path / "run"))]) == 0
    err = capsys.readouterr().err
    for line in ["measuring the model before training …", "generating 1 sample before training …",
                 "evaluating task loss (perplexity) …", "generating 1 sample after training …",
                 "measuring the model after training …", "saving the trained adapter …",
                 "saving the trained adapter: done in"]:
        assert line in err, (line, err)
    # inside training the step lines speak; a quick eval at step 2 adds no lines of its own
    assert "evaluating at step 2" not in err
    steps = [line for line in err.splitlines() if line.startswith("step ")]
    assert [int(STEP_LINE.match(s).group(1)) for s in steps] == [1, 2, 3, 4], steps


def test_a_long_phase_reports_progress_without_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(console_mod, "PLAIN_EVERY", 0.0)  # every batch is "long enough" for a progress line
    with console_mod.phase("scoring"):
        console_mod.progress(3)
        for _ in range(3):
            console_mod.advance()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "scoring …" and "scoring: 3/3 (0 s)" in err and err[-1].startswith("scoring: done in")


def test_a_delayed_phase_says_nothing_when_it_ends_quickly(capsys):
    """`tunelab export` on a bad path: the error is the only line; a real export still announces itself."""
    import time

    with pytest.raises(ValueError):
        with console_mod.phase("exporting", delay=0.5):
            raise ValueError("bad path")
    with console_mod.phase("quick", delay=0.5):
        pass
    assert capsys.readouterr().err == ""
    with console_mod.phase("exporting", delay=0.05):
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "exporting …" and err[1].startswith("exporting: done in")


def test_eta_works_when_a_step_takes_minutes():
    """rich's own estimate drops samples older than 30 s, so a 45 s step never had one (`-:--:--`)."""
    out = io.StringIO()
    with TrainDisplay(total=10, log_every=1, out=Console(file=out, width=300)) as display:
        display.step(1, 1.0, 1e-4, 100.0, 45.0, {})
        display.step(2, 0.9, 1e-4, 100.0, 75.0, {})
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("eta 0:06:45")  # 45 s × 9 steps left
    assert lines[1].endswith("eta 0:08:00")  # mean(45, 75) × 8 steps left


def test_online_rl_numbers_on_the_step_line():
    extra = step_extra({"reward": 0.25, "kl": 0.01, "zero_signal_groups": 0.5, "truncated": 0.125, "round": 0})
    assert extra == "reward 0.250  kl 0.010  zero-signal 50%  truncated 12%  round 1"


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def test_output_to_a_file_has_one_line_per_logged_step(sft_config, tmp_path):
    log = tmp_path / "train.log"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(sft_config(tmp_path / "run", 6, 2))],
                              stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    steps = [line for line in text.splitlines() if line.startswith("step ")]
    assert [STEP_LINE.match(s).group(1, 2) for s in steps] == [("2", "6"), ("4", "6"), ("6", "6")], text
    assert "\x1b[" not in text and "\r" not in text  # no terminal escapes in a log file
    assert not re.search(r"^train ", text, re.M)  # and no final bar line


def test_stdout_redirected_keeps_the_bar_on_the_terminal_and_the_steps_in_the_file(sft_config, tmp_path):
    master, slave = pty.openpty()
    seen = []
    reader = threading.Thread(target=lambda: _drain(master, seen), daemon=True)
    reader.start()
    log = tmp_path / "train.log"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(sft_config(tmp_path / "run", 3))],
                              stdout=f, stderr=slave, env=_env(), cwd=tmp_path, timeout=600)
    os.close(slave)
    reader.join(10)
    terminal = b"".join(seen).decode(errors="replace")
    assert proc.returncode == 0, terminal[-3000:]
    assert [STEP_LINE.match(s).group(1) for s in log.read_text().splitlines() if s.startswith("step ")] == \
        ["1", "2", "3"]
    assert "train" in terminal and "ETA" in terminal and "━" in terminal  # the rich bar, on the terminal
    assert "measuring the model before training" in terminal  # a phase's live row


def _drain(fd, into):
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        into.append(chunk)

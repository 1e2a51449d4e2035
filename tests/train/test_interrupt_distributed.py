"""Ctrl-C under torchrun (`tunelab train --nproc 2`, CPU, gloo): every rank stops at the same step, one sharded
checkpoint is saved there, one line is printed, the status is 130 — no traceback, no rank left running — and
the same command resumes from that step. A second Ctrl-C aborts the ranks at once; leftover ranks are killed.

The ranks are `python -m tunelab` processes started by torchrun, so the test slows their steps through a
`sitecustomize` on their PYTHONPATH (every micro-batch sleeps), so that a Ctrl-C lands while a step runs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import alpaca_rows, wait_for_line, save_tiny_model, train_losses, write_config, write_jsonl
from tunelab.train.checkpoint import complete_checkpoints
from tunelab.train.checkpoint_files import MANIFEST, damage
from tunelab.train import interrupt, launch
from tunelab.train.interrupt import StopRequest, stopping
from tunelab.train.launch import launch_ranks, signal_ranks

ROOT = Path(__file__).resolve().parents[2]
SLOW_STEPS = """
import os
if os.environ.get("TUNELAB_TEST_MICRO_SLEEP"):  # a rank of the test: every micro-batch takes this long
    import time
    import tunelab.train.loop as loop
    real, pause = loop.batch_tokens, float(os.environ["TUNELAB_TEST_MICRO_SLEEP"])
    def slow(batch):
        time.sleep(pause)
        return real(batch)
    loop.batch_tokens = slow
"""
LINE = r"^interrupted at step (\d+)/30: kept checkpoint (\S+); run the same command again to resume$"


@pytest.fixture
def cfg(tmp_path, tokenizer):
    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12))
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_STEPS)
    return write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "run"), parallel="ddp",
                        model={"name": str(model)}, data={"train": str(data), "max_length": 64},
                        train={"max_steps": 30, "batch_size": 2, "lr": 1e-2, "save_every": None},
                        samples={"n_heldout": 0}, lora={"r": 2})


def _env(tmp_path: Path, sleep: float | None) -> dict:
    path = [str(ROOT / "src"), str(ROOT)] + ([str(tmp_path / "slow")] if sleep else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    return {**env, "TUNELAB_TEST_MICRO_SLEEP": str(sleep)} if sleep else env


def _start(cfg: Path, tmp_path: Path, sleep: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg), "--nproc", "2"], cwd=tmp_path,
                            env=_env(tmp_path, sleep), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)




def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def _none_alive(pids: list[int]) -> bool:
    deadline = time.monotonic() + 10  # the ranks have exited: init reaps them
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


def test_ctrl_c_stops_every_rank_at_one_step_saves_one_sharded_checkpoint_and_a_rerun_resumes(tmp_path, cfg):
    proc = _start(cfg, tmp_path, sleep=0.3)
    out = wait_for_line(proc, r"^step 2/30")
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    proc.send_signal(signal.SIGINT)
    after = proc.communicate(timeout=300)[0]
    out += after
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    # what the Ctrl-C printed: rank 0's notice and its line (the other rank and torchrun's agent say nothing)
    said = [ln for ln in after.splitlines() if ln.strip() and not ln.startswith("step ")]
    assert len(said) == 2 and said[0].startswith("Ctrl-C: every rank stops at the end of this step"), out
    assert "--shutdown-timeout, 120 s;" in said[0]
    lines = re.findall(LINE, out, re.M)
    assert len(lines) == 1, out
    step = int(lines[0][0])
    ckpts = tmp_path / "run" / "checkpoints"
    kept = ckpts / f"step-{step:06d}"
    assert step >= 2 and Path(lines[0][1]) == kept
    # one complete sharded checkpoint at that step, saved by both ranks together; nothing half-written beside it
    assert complete_checkpoints(ckpts) == [kept] and damage(kept) is None
    assert sorted(p.name for p in ckpts.iterdir()) == [kept.name]
    files = json.loads((kept / MANIFEST).read_text())["files"]
    assert sum(name.startswith("dcp/shard-") for name in files) == 2
    assert {"rng-0.safetensors", "rng-1.safetensors", "state.json"} <= set(files)
    assert json.loads((kept / "state.json").read_text())["world"] == 2
    assert [s for s, _ in train_losses(tmp_path / "run")] == list(range(1, step + 1))
    assert _none_alive(ranks)

    # the same command, not slowed down: resumes at that step and finishes
    again = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--nproc", "2"], cwd=tmp_path,
                           env=_env(tmp_path, None), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and f"(step {step})" in again.stderr  # (rich wraps the long path)
    assert [s for s, _ in train_losses(tmp_path / "run")] == list(range(1, 31))


def test_a_second_ctrl_c_aborts_every_rank_at_once_and_names_the_last_kept_checkpoint(tmp_path, cfg):
    proc = _start(cfg, tmp_path, sleep=3.0)  # steps far longer than the two signals take to arrive
    out = wait_for_line(proc, r"^step 1/30")
    ranks = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    out += wait_for_line(proc, r"Ctrl-C again to abort now")
    proc.send_signal(signal.SIGINT)
    out += proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "interrupted at step" not in out
    lines = re.findall(r"^aborted after step (\d+)/30: (.*)$", out, re.M)
    assert len(lines) == 1, out  # rank 0's only
    assert int(lines[0][0]) >= 1
    # no periodic checkpoint and the step's own save never came: nothing kept, a re-run starts over
    assert lines[0][1] == "no checkpoint was kept; running the same command again starts from step 0"
    assert not complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(ranks) == 2 and _none_alive(ranks)


def _stubborn_rank(tmp_path: Path, launch: str) -> subprocess.Popen:
    """A process that ignores SIGINT, in a session of its own as torchrun starts a rank, of launch `launch`."""
    ignore = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); " \
             "time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", ignore], start_new_session=True, stdout=subprocess.PIPE,
                            env={**os.environ, "TUNELAB_ERROR_FILE": str(tmp_path / launch)})
    assert proc.stdout.readline()
    return proc


def test_ranks_left_running_are_found_by_their_launch_and_killed(tmp_path):
    """`tunelab train --nproc` kills whatever rank of its launch outlives torchrun (one that ignores SIGINT
    here), by the launch's own environment entry: another child process is left alone."""
    rank, other = _stubborn_rank(tmp_path, "launch-1"), _stubborn_rank(tmp_path, "launch-2")
    marker = f"TUNELAB_ERROR_FILE={tmp_path / 'launch-1'}"
    try:
        assert launch_ranks(marker) == [rank.pid]
        signal_ranks(marker, signal.SIGINT)  # ignored: still running
        with pytest.raises(subprocess.TimeoutExpired):
            rank.wait(0.5)
        signal_ranks(marker, signal.SIGKILL)
        assert rank.wait(10) == -signal.SIGKILL
        assert other.poll() is None and launch_ranks(marker) == []
    finally:
        for p in (rank, other):
            p.kill()
            p.wait()


def test_ctrl_c_on_tunelab_train_nproc_goes_to_torchrun_then_to_the_ranks_then_kills_them(tmp_path):
    """The first SIGINT is torchrun's own `SignalException` (torchrun sends it on and waits); the second is sent
    to the ranks (their abort); the third SIGKILLs them; `close` puts the previous handlers back."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    rank = _stubborn_rank(tmp_path, "launch-1")
    before = signal.getsignal(signal.SIGINT)
    forward = launch._ForwardInterrupts(f"TUNELAB_ERROR_FILE={tmp_path / 'launch-1'}")
    try:
        forward.install()
        assert signal.getsignal(signal.SIGINT) is forward
        with pytest.raises(SignalException) as first:
            forward(signal.SIGINT, None)
        assert first.value.sigval == signal.SIGINT
        forward(signal.SIGINT, None)  # sent on: this one ignores it
        with pytest.raises(subprocess.TimeoutExpired):
            rank.wait(0.5)
        forward(signal.SIGINT, None)
        assert rank.wait(10) == -signal.SIGKILL
    finally:
        forward.close()
        rank.kill()
        rank.wait()
    assert signal.getsignal(signal.SIGINT) is before


class _Ranks:
    """`Engine.max_int` of two ranks, both of whose flags are known: the all-reduce the ranks run at a step end."""

    def __init__(self, *stops: StopRequest):
        self.stops = stops

    def max_int(self, value: int) -> int:
        return max(int(s.requested) for s in self.stops)


def test_ranks_agree_to_stop_when_any_one_of_them_got_the_signal(tmp_path, monkeypatch):
    monkeypatch.setattr(interrupt, "_stopping", [])  # this test process's record of a requested stop
    first, second = (StopRequest(tmp_path, 30, enabled=False) for _ in range(2))
    ranks = _Ranks(first, second)
    assert not first.agreed(ranks.max_int) and not second.agreed(ranks.max_int)
    first._handler(signal.SIGINT, None)  # only rank 0's SIGINT has come so far
    assert first.requested and not second.requested
    assert first.agreed(ranks.max_int) and second.agreed(ranks.max_int)  # both stop after this step
    assert second.requested and stopping() is not None  # rank 1 is stopping too: its next SIGINT aborts
    assert StopRequest(tmp_path, 30, enabled=False).agreed() is False  # one process: its own flag


@pytest.mark.parametrize("rank,said", [("0", "aborted after step 4/30: no checkpoint was kept; running the same "
                                             "command again starts from step 0\n"), ("1", "")], ids=["rank0", "rank1"])
def test_a_rank_whose_collective_breaks_during_a_stop_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys,
                                                                                    rank, said):
    """A peer that aborted (its second SIGINT) or was killed by torchrun breaks this rank's collective: gloo raises
    RuntimeError. While a stop is under way that is part of the Ctrl-C — status 130, rank 0 names what a re-run
    resumes from, no traceback; any other error, or the same one with no stop under way, still shows."""
    import tunelab.objectives
    import tunelab.train.distributed
    import tunelab.train.launch
    from tunelab.cli import main

    monkeypatch.setattr(interrupt, "_stopping", [])
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of a 2-rank launch (the process group itself is not needed)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(tunelab.train.distributed, "init", lambda: None)
    monkeypatch.setattr(tunelab.objectives, "load_run_config", lambda *a: None)
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    errors = {"gloo": RuntimeError("Connection closed by peer"), "bug": ValueError("a bug")}

    def train(cfg, source=None, stop_requested=True, error="gloo"):
        stop = StopRequest(tmp_path / "checkpoints", 30, step=4, enabled=False, announce=False)
        stop.agreed(lambda flag: int(stop_requested))  # a peer's Ctrl-C came: every rank is stopping
        raise errors[error]

    monkeypatch.setattr(tunelab.train.launch, "train", train)
    with pytest.raises(SystemExit) as stopped:
        main(["train", "c.yaml"])
    assert stopped.value.code == 130 and capsys.readouterr().err == said
    monkeypatch.setattr(tunelab.train.launch, "train", lambda cfg, source=None: train(cfg, error="bug"))
    with pytest.raises(ValueError):
        main(["train", "c.yaml"])
    monkeypatch.setattr(interrupt, "_stopping", [])
    monkeypatch.setattr(tunelab.train.launch, "train", lambda cfg, source=None: train(cfg, stop_requested=False))
    with pytest.raises(RuntimeError):
        main(["train", "c.yaml"])

"""Interrupt and resume: Ctrl-C keeps a checkpoint and says so; a finished run is extended by a larger max_steps;
`train.resume_from` starts from another run's checkpoint; `lora.init_from` starts from a saved adapter."""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import alpaca_rows, wait_for_line, save_tiny_model, train_losses, write_config, write_jsonl
from tunelab.cli import main

ROOT = Path(__file__).resolve().parents[2]
# `tunelab train` with every micro-batch slowed down, so a test can send SIGINT while a step runs
SLOW_TRAIN = """
import sys, time
import tunelab.train.loop as loop
real = loop.batch_tokens
def slow(batch):
    time.sleep(0.3)
    return real(batch)
loop.batch_tokens = slow
from tunelab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer)


@pytest.fixture
def make_cfg(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12))

    def make(name, **extra):
        sections = {"output_dir": str(tmp_path / name), "model": {"name": str(model_dir)},
                    "data": {"train": str(data), "max_length": 64},
                    "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "save_every": 2},
                    "samples": {"n_heldout": 0}, "lora": {"r": 2}}
        for k, v in extra.items():
            sections[k] = {**sections.get(k, {}), **v} if isinstance(v, dict) else v
        return write_config(tmp_path / f"{name}.yaml", **sections)

    return make


def _cli(capsys, *argv):
    rc = main(["train", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _start_slow(cfg: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, "train", str(cfg), "train.max_steps=30"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)




def test_ctrl_c_keeps_a_checkpoint_at_the_step_and_a_rerun_resumes_there(tmp_path, make_cfg, capsys):
    cfg = make_cfg("run", train={"save_every": None})  # no periodic checkpoints: the interrupt's own is the one
    proc = _start_slow(cfg, tmp_path)
    wait_for_line(proc, r"^step 2/30")
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130
    assert "Traceback" not in out
    m = re.search(r"^interrupted at step (\d+)/30: kept checkpoint (\S+); run the same command again to resume$",
                  out, re.M)
    assert m, out
    step = int(m.group(1))
    assert step >= 2 and Path(tmp_path / m.group(2)).name == f"step-{step:06d}"
    assert [s for s, _ in train_losses(tmp_path / "run")] == list(range(1, step + 1))

    rc, out = _cli(capsys, cfg, "train.max_steps=30")  # the same command (not slowed down this time)
    assert rc == 0, out
    assert f"(step {step})" in out and "resumed from" in out
    assert [s for s, _ in train_losses(tmp_path / "run")] == list(range(1, 31))


def test_a_second_ctrl_c_aborts_at_once_and_names_the_last_kept_checkpoint(tmp_path, make_cfg):
    cfg = make_cfg("run", train={"save_every": 1})
    proc = _start_slow(cfg, tmp_path)
    wait_for_line(proc, r"^step 2/30")
    proc.send_signal(signal.SIGINT)
    wait_for_line(proc, r"Ctrl-C again to abort now")
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Traceback" not in out
    m = re.search(r"^aborted after step (\d+)/30: kept checkpoint (\S+); run the same command again to resume$",
                  out, re.M)
    assert m, out
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept[-1] == Path(m.group(2)).name and not any(k.startswith(".tmp") for k in kept)


def test_a_finished_run_is_extended_by_a_larger_max_steps(tmp_path, make_cfg, capsys):
    cfg = make_cfg("run")
    assert _cli(capsys, cfg)[0] == 0
    run = tmp_path / "run"
    first = json.loads((run / "results.json").read_text())
    loop4 = json.loads((run / "checkpoints" / "step-000004" / "state.json").read_text())["loop"]
    usage4 = loop4["usage"]
    assert usage4["wall_seconds"] > 0 and usage4["cpu_seconds"] > 0 and loop4["train_seconds"] > 0
    assert usage4["invocations"] == 1

    # the same start by another route: a new run from the step-4 checkpoint (train.resume_from)
    other = make_cfg("other", train={"max_steps": 6, "resume_from": str(run / "checkpoints" / "step-000004")})
    rc, out = _cli(capsys, other)
    assert rc == 0, out

    rc, out = _cli(capsys, cfg, "train.max_steps=6")
    assert rc == 0, out
    assert "continuing finished run from step 4 to 6" in out
    extended = json.loads((run / "results.json").read_text())["budget"]
    assert extended["invocations"] == 2 and extended["wall_seconds"] > usage4["wall_seconds"]
    assert extended["steps"] == 6
    assert "resumed from" in out and "(step 4)" in out
    losses = train_losses(run)
    assert [s for s, _ in losses] == list(range(1, 7))
    # steps 5 and 6 started from the step-4 weights, optimizer and data position: the same as the run started
    # from that checkpoint (bit-identical on CPU)
    assert losses[4:] == train_losses(tmp_path / "other")
    assert train_losses(tmp_path / "other")[0][0] == 5
    # the schedule recomputed for 6 steps from step 4: cosine at 4/6 (no warmup: round(0.03 · 6) = 0)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lr5 = next(r["lr"] for r in rows if r.get("step") == 5 and "loss" in r)
    assert lr5 == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 4 / 6)), rel=1e-9)
    # results cover the whole run: 6 steps, every token of all of them, both parts' time
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == res["budget"]["steps"] == 6
    assert res["train_tokens"] == res["budget"]["tokens_trained"]
    assert res["train_tokens"] == [r for r in rows if "loss" in r][-1]["tokens"] > first["train_tokens"]
    assert res["budget"]["wall_seconds"] > usage4["wall_seconds"]
    assert res["train_seconds"] > loop4["train_seconds"]

    rc, out = _cli(capsys, cfg, "train.max_steps=6")  # finished at 6 now
    assert rc == 2 and "holds a finished run" in out
    rc, out = _cli(capsys, cfg, "train.max_steps=5")
    assert rc == 2
    assert out.strip() == (f"error: train.max_steps=5 is below the 6 steps of the finished run in {run}; raise it "
                           "to continue that run, or pass overwrite=true to start over")


def test_a_finished_run_without_a_final_checkpoint_says_it_cannot_be_extended(tmp_path, make_cfg, capsys):
    cfg = make_cfg("run", train={"save_every": None})
    assert _cli(capsys, cfg)[0] == 0
    rc, out = _cli(capsys, cfg, "train.max_steps=6")
    assert rc == 2 and len(out.strip().splitlines()) == 1
    assert "kept no checkpoint of its step 4" in out and "lora.init_from=" in out


def test_resume_from_a_checkpoint_of_another_model_or_method_names_the_difference(tmp_path, make_cfg, capsys):
    assert _cli(capsys, make_cfg("run"))[0] == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-000004"
    rc, out = _cli(capsys, make_cfg("b", train={"max_steps": 6, "resume_from": str(ckpt)}, lora={"r": 4}))
    assert rc == 2 and out.strip() == f"error: train.resume_from {ckpt}: trained lora.r=2, this config has lora.r=4"
    rc, out = _cli(capsys, make_cfg("c", method="dora", train={"max_steps": 6, "resume_from": str(ckpt)}))
    assert rc == 2 and out.strip() == (f"error: train.resume_from {ckpt}: trained method=lora, this config has "
                                       "method=dora")
    rc, out = _cli(capsys, make_cfg("d", train={"max_steps": 4, "resume_from": str(tmp_path / "run")}))
    assert rc == 2 and "leaves nothing to train" in out  # a run folder: its newest checkpoint, step 4
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_init_from_a_run_gives_the_saved_adapters_function_at_step_0(tmp_path, make_cfg, capsys):
    from tunelab.export import load_run
    from tunelab.objectives import load_run_config
    from tunelab.train.prepare import prepare

    assert _cli(capsys, make_cfg("run"))[0] == 0
    saved, _, _ = load_run(tmp_path / "run", device="cpu")
    ids = torch.tensor([[1, 5, 9, 200, 33, 7]])
    for source in (tmp_path / "run", tmp_path / "run" / "adapter"):
        p = prepare(load_run_config(make_cfg("new", lora={"init_from": str(source)})))
        assert torch.allclose(_logits(p.model, ids), _logits(saved, ids), atol=1e-5, rtol=0)
        assert any("initialised from the adapter" in n for n in p.report.notes)
    fresh = prepare(load_run_config(make_cfg("fresh")))
    assert not torch.allclose(_logits(fresh.model, ids), _logits(saved, ids), atol=1e-5, rtol=0)

    # a whole run from it starts at step 0 with a fresh optimizer
    rc, out = _cli(capsys, make_cfg("new", lora={"init_from": str(tmp_path / "run")}, train={"max_steps": 2}))
    assert rc == 0, out
    assert [s for s, _ in train_losses(tmp_path / "new")] == [1, 2]


@pytest.mark.parametrize("change, message", [
    ({"r": 4}, "rank 2 at model.layers.0.self_attn.q_proj in the adapter, 4 in this run (lora.r / rank_pattern)"),
    ({"target_modules": ["q_proj"]}, "the adapter trains model.layers.0.self_attn.k_proj, which this run's "
                                     "lora.target_modules / modules_to_save do not select"),
    ({"alpha": 8.0}, "the adapter has lora_alpha=16, this run lora.alpha=8"),
])
def test_init_from_an_adapter_of_another_shape_names_the_difference(tmp_path, make_cfg, capsys, change, message):
    assert _cli(capsys, make_cfg("run"))[0] == 0
    rc, out = _cli(capsys, make_cfg("new", lora={"init_from": str(tmp_path / "run"), **change}))
    assert rc == 2 and len(out.strip().splitlines()) == 1
    assert message in out, out
    assert not (tmp_path / "new").exists()


def test_the_budget_adds_the_earlier_parts_of_a_resumed_run(tmp_path):
    from types import SimpleNamespace

    from tunelab.config import RunConfig
    from tunelab.train import accounting

    res = SimpleNamespace(steps=6, tokens=100)
    now = accounting.Usage.start()
    now.restore({"wall_seconds": 1000.0, "cpu_seconds": 500.0, "invocations": 1})  # what the checkpoint carried
    budget = accounting.consumed(RunConfig(), res, now, tmp_path, 10, 1)
    assert 1000.0 <= budget["wall_seconds"] < 1000.0 + 60 and 500.0 <= budget["cpu_seconds"] < 500.0 + 60
    assert budget["invocations"] == 2


def test_resuming_its_own_checkpoint_under_another_config_is_one_line(tmp_path, make_cfg, capsys):
    from tunelab.objectives import load_run_config
    from tunelab.train.launch import train

    cfg = make_cfg("run")
    train(load_run_config(cfg), stop_after=3)  # "killed" after step 3: the checkpoint at step 2 is kept
    capsys.readouterr()
    run = tmp_path / "run"
    rc, out = _cli(capsys, cfg, "lora.r=4")
    assert rc == 2 and out.strip() == f"error: output_dir {run}: trained lora.r=2, this config has lora.r=4"
    rc, out = _cli(capsys, cfg, "train.max_steps=1")
    assert rc == 2 and out.strip() == (f"error: train.max_steps=1 is below the step of the checkpoint the run in {run} "
                                       "would resume from (step-000002); raise it, or pass overwrite=true to start over")
    rc, out = _cli(capsys, cfg)
    assert rc == 0 and "(step 2)" in out


def test_ctrl_c_outside_a_training_step_names_what_a_rerun_starts_from(tmp_path, make_cfg, capsys, monkeypatch):
    from tunelab.train import run as single_run

    cfg = make_cfg("run")
    assert _cli(capsys, cfg)[0] == 0  # finished: checkpoints at 2 and 4

    def measuring(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(single_run, "evaluate_final", measuring)  # Ctrl-C while the extended run measures at its end
    rc, out = _cli(capsys, cfg, "train.max_steps=6")
    assert rc == 130 and "Traceback" not in out
    assert out.strip().splitlines()[-1] == (f"interrupted: kept checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-000006'}"
                                            "; run the same command again to resume")
    monkeypatch.undo()
    rc, out = _cli(capsys, cfg, "train.max_steps=6")  # the rerun only measures and saves
    assert rc == 0 and "(step 6)" in out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 6
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the final evaluation, written after the step-6 checkpoint, ran again on the rerun: once in the log
    assert [r["step"] for r in rows if "loss" not in r] == [4, 6]


@pytest.mark.parametrize("method", ["mora", "loreft"])
def test_init_from_a_mora_or_loreft_run_loads_its_adapter(tmp_path, make_cfg, capsys, method):
    from tunelab.adapters.base import adapter_state_dict
    from tunelab.export import load_run
    from tunelab.objectives import load_run_config
    from tunelab.train.prepare import prepare

    assert _cli(capsys, make_cfg("run", method=method, train={"max_steps": 2}))[0] == 0
    saved = adapter_state_dict(load_run(tmp_path / "run", device="cpu")[0])
    p = prepare(load_run_config(make_cfg("new", method=method, **{method: {"init_from": str(tmp_path / "run")}})))
    now = adapter_state_dict(p.model)
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in now)
    rc, out = _cli(capsys, make_cfg("new", method=method, train={"max_steps": 1},
                                    **{method: {"init_from": str(tmp_path / "run")}}))
    assert rc == 0, out
    assert "init_from" not in (tmp_path / "new" / "adapter" / "tunelab_adapter.json").read_text()  # no local path
    rc, out = _cli(capsys, make_cfg("lora", lora={"init_from": str(tmp_path / "run")}))
    assert rc == 2 and f"holds a '{method}' adapter, not lora" in out


def test_an_interrupt_whose_checkpoint_cannot_be_saved_names_the_one_kept(tmp_path, make_cfg, capsys, monkeypatch):
    from tunelab.errors import TunelabError
    from tunelab.train import loop
    # whatever this process had (a shell's background job inherits SIGINT ignored, not Python's default)
    before = signal.getsignal(signal.SIGINT)

    seen = {"batches": 0}
    real_tokens, real_save = loop.batch_tokens, loop.save_checkpoint

    def tokens(batch):  # one micro-batch per step: Ctrl-C during step 3
        seen["batches"] += 1
        if seen["batches"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_tokens(batch)

    def save(ckpt_dir, step, *a, **k):
        if step == 3:
            raise TunelabError("disk full: writing checkpoint step-000003")
        return real_save(ckpt_dir, step, *a, **k)

    monkeypatch.setattr(loop, "batch_tokens", tokens)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    rc, out = _cli(capsys, make_cfg("run", train={"max_steps": 6}))
    assert rc == 130 and "Traceback" not in out
    kept = tmp_path / "run" / "checkpoints" / "step-000002"
    assert out.strip().splitlines()[-1] == ("interrupted at step 3/6: no checkpoint at this step (disk full: writing "
                                            f"checkpoint step-000003); kept checkpoint {kept}; run the same command "
                                            "again to resume")
    assert signal.getsignal(signal.SIGINT) is before  # the loop put the handler back

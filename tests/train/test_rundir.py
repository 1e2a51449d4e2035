"""The run directory: tunelab deletes only what it wrote, only after validation, and one run at a time owns it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train.launch import train
from tunelab.train.rundir import (LOCK_FILE, MARKER, check_output_dir, claim_run_dir, clear_run_files, locked,
                                  run_marker)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer)


@pytest.fixture
def make_cfg(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))

    def make(out, **extra):
        sections = {"output_dir": str(out), "model": {"name": str(model_dir)},
                    "data": {"train": str(data), "max_length": 64}, "train": {"max_steps": 1, "batch_size": 2},
                    "samples": {"n_heldout": 0}, "lora": {"r": 2}}
        for k, v in extra.items():
            sections[k] = {**sections.get(k, {}), **v} if isinstance(v, dict) else v
        return write_config(tmp_path / "c.yaml", **sections)

    return make


def _cli(capsys, argv):
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flag", ["overwrite=true", "resume=false"])
def test_a_users_folder_is_refused_and_kept(tmp_path, make_cfg, capsys, flag):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc, err = _cli(capsys, ["train", str(make_cfg(out)), flag])
    assert rc == 2 and len(err) == 1 and "not empty and not a tunelab run" in err[0] and str(out) in err[0]
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_removes_only_the_runs_own_files(tmp_path, make_cfg):
    out = tmp_path / "run"
    train(load_config(make_cfg(out)))
    (out / "notes.txt").write_text("mine")
    (out / "results.json").write_text('{"marker": 1}')
    train(load_config(make_cfg(out), ["overwrite=true"]))
    assert (out / "notes.txt").read_text() == "mine"
    assert "marker" not in json.loads((out / "results.json").read_text())  # retrained


def test_overwrite_with_a_bad_config_destroys_nothing(tmp_path, make_cfg, capsys):
    out = tmp_path / "run"
    train(load_config(make_cfg(out)))
    before = sorted(p.name for p in out.iterdir())
    results = (out / "results.json").read_text()
    capsys.readouterr()  # the first run's progress output
    for bad in (["train.optimizer=Adamm"], ["train.optimizer=LBFGS"], ["model.attn_implementation=nope"]):
        rc, err = _cli(capsys, ["train", str(make_cfg(out)), "overwrite=true", *bad])
        assert rc == 2 and len(err) == 1, err
        assert sorted(p.name for p in out.iterdir()) == before and (out / "results.json").read_text() == results


def test_unknown_optimizer_leaves_no_folder(tmp_path, make_cfg, capsys):
    out = tmp_path / "new"
    rc, err = _cli(capsys, ["train", str(make_cfg(out)), "train.optimizer=Adamm"])
    assert rc == 2 and "train.optimizer" in err[0]
    assert not out.exists()


def test_output_dir_that_is_a_file_or_cannot_be_created(tmp_path, make_cfg, capsys):
    file = tmp_path / "f"
    file.write_text("x")
    for out, expected in [(file, "exists and is not a folder"), (file / "sub", "is not a folder"),
                          (Path("/proc/tunelab-run"), "cannot write in /proc")]:
        if str(out).startswith("/proc") and not Path("/proc/self").exists():
            continue
        rc, err = _cli(capsys, ["train", str(make_cfg(out))])
        assert rc == 2 and len(err) == 1 and expected in err[0], err
    assert file.read_text() == "x"


def test_a_second_run_into_a_held_folder_is_refused(tmp_path, make_cfg, capsys):
    out = tmp_path / "run"
    out.mkdir()
    capsys.readouterr()
    with locked(out):  # the first run holds it
        rc, err = _cli(capsys, ["train", str(make_cfg(out))])
    assert rc == 2 and len(err) == 1 and "in use by another tunelab run" in err[0] and f"pid {os.getpid()}" in err[0]
    assert not (out / "metrics.jsonl").exists()
    train(load_config(make_cfg(out)))  # released: the folder is usable again
    assert (out / "results.json").exists()


def test_a_killed_run_does_not_leave_its_folder_locked(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"), str(out / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TunelabError, match="in use"):
            with claim_run_dir(out, overwrite=False, resume=True):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with claim_run_dir(out, overwrite=False, resume=True) as created:  # the OS released the dead run's lock
        assert created is False


def test_a_second_pipeline_into_a_held_root_is_refused(tmp_path, make_cfg, capsys):
    out = tmp_path / "pipe"
    cfg = make_cfg(out, stages=[{"name": "a", "objective": "sft"}])
    out.mkdir()
    with locked(out):
        rc, err = _cli(capsys, ["train", str(cfg)])
    assert rc == 2 and "in use by another tunelab run" in err[0]
    assert not (out / "a").exists()


def test_a_pipeline_stage_folder_holding_user_files_is_refused_before_training(tmp_path, make_cfg, capsys):
    out = tmp_path / "pipe"
    (out / "b").mkdir(parents=True)
    (out / "b" / "data.csv").write_text("keep")
    cfg = make_cfg(out, stages=[{"name": "a", "objective": "sft"}, {"name": "b", "objective": "sft"}])
    rc, err = _cli(capsys, ["train", str(cfg), "overwrite=true"])
    assert rc == 2 and "b: not empty and not a tunelab run" in err[0]
    assert not (out / "a").exists() and (out / "b" / "data.csv").read_text() == "keep"


def test_check_output_dir_writes_nothing(tmp_path):
    check_output_dir(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    started = time.perf_counter()
    check_output_dir(tmp_path)  # an empty folder is fine
    assert time.perf_counter() - started < 1


# --- which folders are tunelab's: only its marker says so, never common file names -----------------------------

def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_a_users_folder_named_like_a_pipeline_is_not_one(tmp_path, make_cfg, capsys):
    """The user's own pipeline.yaml + model/ + notes.txt: `overwrite: true` used to delete pipeline.yaml and model/."""
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.safetensors").write_bytes(b"mine")
    (out / "pipeline.yaml").write_text("my: own pipeline\n")
    (out / "notes.txt").write_text("notes")
    before = _tree(out)
    cfg = make_cfg(out, stages=[{"name": "a", "objective": "sft"}])
    rc, err = _cli(capsys, ["train", str(cfg), "overwrite=true"])
    assert rc == 2 and len(err) == 1 and str(out) in err[0] and "marker" in err[0], err
    assert _tree(out) == before


def test_a_users_folder_named_like_an_old_run_is_not_one(tmp_path, make_cfg, capsys):
    """config.yaml + metrics.jsonl + checkpoints/epoch3/model.pt: its checkpoints used to be deleted."""
    out = tmp_path / "experiment"
    (out / "checkpoints" / "epoch3").mkdir(parents=True)
    (out / "checkpoints" / "epoch3" / "model.pt").write_bytes(b"three epochs of my training")
    (out / "config.yaml").write_text("lr: 3\n")
    (out / "metrics.jsonl").write_text('{"loss": 1}\n')
    before = _tree(out)
    for flag in ("overwrite=true", "resume=false", "resume=true"):
        rc, err = _cli(capsys, ["train", str(make_cfg(out)), flag])
        assert rc == 2 and len(err) == 1 and f"output_dir {out}: no .tunelab-run marker" in err[0], err
        assert _tree(out) == before


def test_an_unmarked_lock_file_alone_does_not_make_a_folder_a_run(tmp_path, make_cfg, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / LOCK_FILE).write_text("123\n")
    (out / "results.json").write_text("{}")
    rc, err = _cli(capsys, ["train", str(make_cfg(out)), "overwrite=true"])
    assert rc == 2 and "older tunelab" in err[0] and (out / "results.json").read_text() == "{}"


def test_runs_and_pipelines_carry_a_marker_with_their_id(tmp_path, make_cfg):
    out = tmp_path / "run"
    train(load_config(make_cfg(out)))
    first = run_marker(out)
    assert first["kind"] == "run" and len(first["id"]) == 32 and first["tunelab"]
    assert json.loads((out / MARKER).read_text()) == first
    (out / "notes.txt").write_text("mine")
    train(load_config(make_cfg(out), ["overwrite=true"]))
    assert run_marker(out)["id"] != first["id"]  # a new run, a new id
    assert (out / "notes.txt").read_text() == "mine"

    pipe = tmp_path / "pipe"
    train(load_config(make_cfg(pipe, stages=[{"name": "a", "objective": "sft"}])))
    assert run_marker(pipe)["kind"] == "pipeline" and run_marker(pipe / "a")["kind"] == "run"
    (pipe / "notes.txt").write_text("mine")
    train(load_config(make_cfg(pipe, stages=[{"name": "a", "objective": "sft"}]), ["overwrite=true"]))
    assert (pipe / "notes.txt").read_text() == "mine" and (pipe / "a" / "results.json").exists()


def test_a_run_and_a_pipeline_do_not_take_each_others_folder(tmp_path, make_cfg, capsys):
    out = tmp_path / "run"
    train(load_config(make_cfg(out)))
    capsys.readouterr()
    rc, err = _cli(capsys, ["train", str(make_cfg(out, stages=[{"name": "a", "objective": "sft"}])),
                            "overwrite=true"])
    assert rc == 2 and "holds a tunelab run, not a pipeline" in err[0]
    assert (out / "results.json").exists() and not (out / "a").exists()


def test_clearing_an_unmarked_folder_is_refused_even_if_called_directly(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(TunelabError, match="no .tunelab-run marker"):
        clear_run_files(tmp_path)
    assert (tmp_path / "model").is_dir()

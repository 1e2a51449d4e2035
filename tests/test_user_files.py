"""The user's files are never lost: `report --out`, `export --gguf` and `eval --output` replace only a file tunelab
wrote (or with --overwrite), check the output path before loading anything, and a full disk, /proc or a read-only
mount is one line with nothing left behind. Through the CLI (`tunelab.cli.main`, and `python -m tunelab` inside a
private mount namespace): the promise is its one line and exit status."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tunelab

from tests.helpers import save_tiny_model

SRC = Path(tunelab.__file__).resolve().parents[1]  # the tunelab under test, for the subprocesses


def tunelab(*args, cwd=None, wrap: list[str] | None = None, timeout=300):
    """(exit status, stderr lines) of `python -m tunelab ARGS` (inside `wrap`, e.g. an unshare namespace)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tunelab", *map(str, args)]
    p = subprocess.run((wrap or []) + cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stderr.strip().splitlines()


def cli(capsys, *args):
    """(exit status, stderr lines) of the CLI in this process (a traceback fails the test)."""
    from tunelab.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def _one_line(err: list[str]) -> str:
    """The error is one line, and the last: a slow step may have said what it was doing before it failed."""
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    assert all(line.endswith("…") for line in err[:-1]), err  # only progress lines before it
    return err[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: lora\n")
    (run / "results.json").write_text(json.dumps({"steps": 3, "eval_loss_before": 2.0, "eval_loss_after": 1.5}))
    return run


def test_report_never_replaces_the_users_results(tmp_path, run_dir, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "results.md").write_text("my results")
    (out / "results.csv").write_text("a,b\n1,2\n")
    rc, err = cli(capsys, "report", run_dir, "--out", out)
    assert rc == 2 and f"{out / 'results.md'}: exists and was not written by tunelab" in _one_line(err)
    assert "--overwrite" in err[0]
    assert (out / "results.md").read_text() == "my results" and (out / "results.csv").read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]  # nothing else written

    rc, _ = cli(capsys, "report", run_dir, "--out", out, "--overwrite")
    assert rc == 0 and (out / "results.md").read_text().startswith("# tunelab report")
    rc, _ = cli(capsys, "report", run_dir, "--out", out)  # its own files: replaced without --overwrite
    assert rc == 0
    (out / "results.md").write_text("edited by hand")  # the user changed it since: theirs now
    rc, err = cli(capsys, "report", run_dir, "--out", out)
    assert rc == 2 and "not written by tunelab" in _one_line(err)
    assert (out / "results.md").read_text() == "edited by hand"


def test_report_leaves_a_users_figure_alone(tmp_path, run_dir, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "curves.png").write_bytes(b"my figure")
    rc, err = cli(capsys, "report", run_dir, "--out", out)
    assert rc == 2 and "curves.png" in _one_line(err) and (out / "curves.png").read_bytes() == b"my figure"


@pytest.mark.parametrize("results", ['{"steps": "three", "method": "lora"}', '[1, 2]',
                                     '{"steps": 3, "eval": {"final": {"task": 0.5}}}',
                                     '{"samples": ["not an object"]}', '{"trainable_params": [1]}', None])
def test_report_on_broken_results_is_one_line_and_writes_nothing(tmp_path, run_dir, results, capsys):
    if results is None:
        (run_dir / "results.json").write_bytes(os.urandom(300))
    else:
        (run_dir / "results.json").write_text(results)
    out = tmp_path / "report"
    out.mkdir()
    rc, err = cli(capsys, "report", run_dir, "--out", out)
    assert rc == 2 and "results.json" in _one_line(err)
    assert list(out.iterdir()) == []  # no half-written results.md


def test_gguf_and_eval_output_never_replace_the_users_file_and_are_checked_first(tmp_path, capsys):
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"my model")
    # the model does not exist: a refusal that names the file proves the path was checked before loading
    rc, err = cli(capsys, "export", tmp_path / "no-such-model", "--gguf", mine)
    assert rc == 2 and f"{mine}: exists and was not written by tunelab" in _one_line(err)
    assert mine.read_bytes() == b"my model"
    results = tmp_path / "mine.json"
    results.write_text('{"mine": 1}')
    rc, err = cli(capsys, "eval", tmp_path / "no-such-model", "--tasks", "arith", "--output", results)
    assert rc == 2 and f"--output {results}: exists and was not written by tunelab" in _one_line(err)
    assert results.read_text() == '{"mine": 1}'
    for odd in (Path("/dev/null"), tmp_path):  # not a regular file / a folder: refused even with --overwrite
        rc, err = cli(capsys, "eval", tmp_path / "no-such-model", "--tasks", "arith", "--output", odd, "--overwrite")
        assert rc == 2 and str(odd) in _one_line(err)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="no /proc")
def test_gguf_into_proc_is_refused_before_loading(tmp_path, capsys):
    rc, err = cli(capsys, "export", tmp_path / "no-such-model", "--gguf", "/proc/tunelab-test.gguf")
    assert rc == 2 and "cannot write in /proc" in _one_line(err)


def test_gguf_rewrites_its_own_file_and_needs_overwrite_for_others(tmp_path, model_dir, capsys):
    out = tmp_path / "m.gguf"
    rc, err = cli(capsys, "export", model_dir, "--gguf", out, "--type", "f32")
    assert rc == 0, err
    size = out.stat().st_size
    rc, err = cli(capsys, "export", model_dir, "--gguf", out, "--type", "f16")  # tunelab's own file
    assert rc == 0, err
    assert out.stat().st_size < size
    out.write_bytes(b"replaced by the user")
    rc, err = cli(capsys, "export", model_dir, "--gguf", out)
    assert rc == 2 and "not written by tunelab" in _one_line(err)
    rc, err = cli(capsys, "export", model_dir, "--gguf", out, "--overwrite")
    assert rc == 0 and out.read_bytes()[:4] == b"GGUF"


def _namespace_works() -> bool:
    if not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return p.returncode == 0


# a private mount namespace (no root needed, nothing outside it changes, gone when the process ends)
needs_namespace = pytest.mark.skipif(not _namespace_works(), reason="unshare --user --mount not permitted here")


@needs_namespace
def test_gguf_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, model_dir):
    disk = tmp_path / "small"
    disk.mkdir()
    wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f"mount -t tmpfs -o size=256k none {disk} && exec \"$@\"", "sh"]
    rc, err = tunelab("export", model_dir, "--gguf", disk / "m.gguf", "--type", "f32", wrap=wrap)
    assert rc == 2 and _one_line(err).startswith("error: disk full: writing the GGUF file"), err
    assert list(disk.iterdir()) == []  # outside the namespace: the tmpfs is gone, and nothing leaked here


@needs_namespace
def test_gguf_onto_a_read_only_mount_is_refused_before_loading(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f"mount --bind -o ro {ro} {ro} && exec \"$@\"", "sh"]
    rc, err = tunelab("export", tmp_path / "no-such-model", "--gguf", ro / "m.gguf", wrap=wrap)
    assert rc == 2 and "Read-only file system" in _one_line(err) and str(ro) in err[0]
    assert list(ro.iterdir()) == []

"""Output paths, devices and backends on the user's path: one `error:` line, exit 2, before any long work."""

from pathlib import Path

import pytest

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.cli import main

PROC = Path("/proc/self").exists()  # a place where nothing can be created, even by root


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("paths")
    model_dir = save_tiny_model(root / "tiny", tokenizer)
    data = write_jsonl(root / "d.jsonl", alpaca_rows(6))
    cfg = write_config(root / "c.yaml", output_dir=str(root / "run"), model={"name": str(model_dir)},
                       data={"train": str(data), "max_length": 64}, train={"max_steps": 1},
                       samples={"n_heldout": 0}, lora={"r": 2})
    assert main(["train", str(cfg)]) == 0
    (root / "afile").write_text("x")
    (root / "bad.gguf").write_text("not gguf")
    return root, cfg


def _err(capsys, argv):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_unusable_output_paths(setup, capsys):
    root, _ = setup
    run = str(root / "run")
    assert "exists and is not a folder" in _err(capsys, ["report", run, "--out", str(root / "afile")])
    assert "is not an empty folder" in _err(capsys, ["export", run, "--merged", str(root / "afile")])
    if PROC:
        assert "cannot write in /proc" in _err(capsys, ["report", run, "--out", "/proc/tunelab-report"])
        assert "cannot write in /proc" in _err(capsys, ["export", run, "--merged", "/proc/tunelab-merged"])
        assert "--output /proc/x/r.json: cannot write" in _err(
            capsys, ["eval", run, "--tasks", "arith", "--output", "/proc/x/r.json"])
    assert "--device: unknown device 'gpu0'" in _err(capsys, ["eval", run, "--tasks", "arith", "--device", "gpu0"])


@pytest.mark.parametrize("override,expected", [
    ("model.device=cuda:7", "model.device=cuda:7"),
    ("model.device=gpu", "model.device: unknown device 'gpu'"),
    ("model.attn_implementation=flash_attention_9", "model.attn_implementation=flash_attention_9"),
    ("model.name=BAD_GGUF", "is not a loadable GGUF file"),
])
def test_devices_backends_and_model_files(setup, capsys, override, expected):
    root, cfg = setup
    override = override.replace("BAD_GGUF", str(root / "bad.gguf"))
    line = _err(capsys, ["train", str(cfg), override, f"output_dir={root / 'new'}"])
    assert expected in line
    assert not (root / "new").exists()

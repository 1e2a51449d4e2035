"""`tunelab examples`: the shipped example configs and studies listed with their first comment line, and copied
(never over an existing file) into a folder outside the repository, where they validate as run configs."""

import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_list_names_every_config_and_study_with_its_first_comment_line(capsys):
    assert main(["examples"]) == 0
    out = capsys.readouterr().out
    shipped = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "examples" / "studies").glob("*.yaml"))
    assert len(shipped) > 10
    for path in shipped:
        name = path.relative_to(ROOT / "examples").as_posix()
        first = next(ln for ln in path.read_text().splitlines() if ln.startswith("#")).lstrip("#").strip()
        assert any(ln.startswith(name + " ") and ln.endswith(first) for ln in out.splitlines()), name


def test_copy_from_a_tmp_dir_validates_and_never_overwrites(tmp_path, capsys):
    from tunelab.objectives import load_run_config

    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "tunelab", "examples", "copy", "lora.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    copied = tmp_path / "lora.yaml"
    assert copied.read_text() == (ROOT / "examples" / "lora.yaml").read_text()
    cfg = load_run_config(copied, ["data.train=${ASSETS}/data/gsm_sft.jsonl"])  # the train --dry-run validation
    assert cfg.method == "lora"
    assert load_run_config(copied).data.train  # as shipped: its data path resolves outside the repo too
    copied.write_text("# mine\n")
    again = subprocess.run([sys.executable, "-m", "tunelab", "examples", "copy", "lora"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        "error: lora.yaml exists; tunelab does not overwrite it: give another DEST"]
    assert copied.read_text() == "# mine\n"  # untouched
    assert main(["examples", "copy", "dpo", str(tmp_path / "nodir" / "x.yaml")]) == 2  # no such folder: one line
    (tmp_path / "sub").mkdir()
    assert main(["examples", "copy", "dpo", str(tmp_path / "sub")]) == 0 and (tmp_path / "sub" / "dpo.yaml").is_file()
    assert main(["examples", "copy", "dpo", str(tmp_path / "mine.yaml")]) == 0 and (tmp_path / "mine.yaml").is_file()
    assert main(["examples", "copy", "nope"]) == 2
    assert "no shipped example 'nope'" in capsys.readouterr().err


def test_copy_all_gives_studies_their_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["examples", "copy", "masking"]) == 2  # a study alone would miss its base, data and tasks
    assert main(["examples", "copy", "all"]) == 0
    assert (tmp_path / "examples" / "studies" / "masking.yaml").is_file()
    assert (tmp_path / "examples" / "studies" / "data").is_dir()
    assert main(["examples", "copy", "all"]) == 2  # never over an existing folder


@pytest.mark.parametrize("name", ["lora.yaml", "dpo.yaml", "grpo_arith.yaml", "loreft.yaml"])
def test_shipped_configs_validate_from_the_package(name):
    from tunelab.examples import find_example
    from tunelab.objectives import load_run_config

    assert load_run_config(find_example(name)).method

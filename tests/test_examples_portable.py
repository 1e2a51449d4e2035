"""The shipped examples work from a copy outside the repository (as after `pip install tunelab`): bundled data and
tasks are named through `${ASSETS}`, never through a path into the source tree."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.eval.tasks import ASSETS, load_task, task_from_dict

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "examples" / "studies").glob("*.yaml"))


def test_task_yaml_expands_assets(tmp_path):
    (tmp_path / "t.yaml").write_text("kind: perplexity\ndata: ${ASSETS}/data/verne_prose.jsonl\nformat: text\n")
    task = load_task(str(tmp_path / "t.yaml"))
    assert task.data_path == (ASSETS / "data" / "verne_prose.jsonl").resolve()
    with pytest.raises(TunelabError, match="data file not found"):
        task_from_dict({"name": "t", "kind": "perplexity", "data": "${ASSETS}/data/nope.jsonl"})


def test_no_shipped_file_points_into_the_source_tree():
    shipped = [*(ROOT / "examples").rglob("*.yaml"), *(ROOT / "src" / "tunelab" / "assets").rglob("*.yaml")]
    offenders = [str(p) for p in shipped if "src/tunelab" in p.read_text() or "../../" in p.read_text()]
    assert not offenders


def test_studies_dry_run_from_a_copy_outside_the_repo(tmp_path):
    """`tunelab compare examples/studies/X.yaml --dry-run` in a folder that holds only a copy of examples/."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    for study in STUDIES:
        proc = subprocess.run([sys.executable, "-m", "tunelab", "compare", f"examples/studies/{study.name}",
                               "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (study.name, proc.stderr[-2000:])
        assert "error" not in proc.stderr.lower(), proc.stderr[-2000:]

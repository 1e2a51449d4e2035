"""`tunelab report` on hand-made run directories (task-evaluation keys present, absent, failed), and the HTML
rendered by headless Chromium."""

import base64
import csv
import json
import shutil
import subprocess
import tempfile

import pytest

from lab_helpers import fake_runs
from tunelab.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    fake_run = fake_runs(tmp_path_factory.mktemp("runs"))
    return [fake_run("full", "full", trainable=100_000, learning=0.30, forgetting=0.20),
            fake_run("lora-r8", r=8, trainable=1_000, learning=0.10, forgetting=0.01),
            fake_run("lora-r64", r=64, trainable=8_000, learning=0.20, forgetting=0.05),
            fake_run("lora-bad", r=2, trainable=500, learning=0.05, forgetting=0.08),
            fake_run("no-tasks", r=4, trainable=700, learning=None)]  # results.json without eval keys


@pytest.fixture(scope="module")
def report(runs):
    out = runs[0].parent.parent / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    return out


def test_report_table_figures_and_html(report):
    out = report
    for name in ("index.html", "results.md", "results.csv", "curves.png", "learning_forgetting.png", "params.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["full", "lora-r8", "lora-r64", "lora-bad", "no-tasks"]
    approx = pytest.approx
    # forgetting per source task reads "> 0 = worse", although the task delta's improvement is < 0 here
    assert float(rows[1]["learning"]) == approx(0.10) and float(rows[1]["forget:prose_loss"]) == approx(0.01)
    assert float(rows[2]["learn:code_loss"]) == approx(0.20) and rows[2]["cfg:lora.r"] == "64"
    assert float(rows[0]["final:code_loss:loss"]) == pytest.approx(1.4) and rows[0]["base:prose_loss:loss"] == "3.0"
    # no task keys: learning is the relative drop of held-out loss (3.0 → 2.5), forgetting unknown
    assert float(rows[4]["learning"]) == pytest.approx(1 / 6) and rows[4]["forgetting"] == ""
    assert rows[4]["learning_from"] == "eval loss" and rows[0]["learning_from"] == "tasks"
    md = (out / "results.md").read_text()
    assert "| lora-r8 | done | lora | 8 |" in md and "| full | done | full | — |" in md  # lora.r: not for full
    assert "Runs without task evaluation (no-tasks)" in md
    page = (out / "index.html").read_text()
    # the Pareto front of (learning, forgetting): full, lora-r64, lora-r8 — lora-bad is dominated by lora-r64
    front = [line.split("<td class='t'>")[1].split("<")[0] for line in page.split("<tr class='front'>")[1:]]
    assert sorted(front) == ["full", "lora-r64", "lora-r8"]
    assert page.count("data:image/png;base64,") == 3 and "src='http" not in page and "<script" not in page
    assert "&lt;b&gt;bold?&lt;/b&gt;" in page and "<b>bold?</b>" not in page  # run text is escaped
    png = page.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_failed_and_incomplete_runs(tmp_path, fake_run):
    done = fake_run("ok", learning=None)
    partial = tmp_path / "runs" / "killed"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n{\"step\": 2, \"lo")
    sweep = tmp_path  # a sweep folder: sweep.json lists the variants, one of them failed
    (sweep / "sweep.json").write_text(json.dumps({"name": "my sweep", "description": "why", "variants": [
        {"name": "ok", "run_dir": str(done), "status": "skipped"},
        {"name": "killed", "run_dir": str(partial), "status": "planned"},
        {"name": "broken", "run_dir": str(tmp_path / "runs" / "broken"), "status": "failed",
         "error": "lora.target_modules: pattern 'x' matches no module"}]}))
    out = tmp_path / "rep"
    assert main(["report", str(sweep), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["variant"], r["status"]) for r in rows] == [("ok", "done"), ("killed", "incomplete"),
                                                           ("broken", "failed")]
    assert "matches no module" in rows[2]["error"]
    page = (out / "index.html").read_text()
    assert "<h1>my sweep</h1>" in page and "1 failed" in page and "No learning-vs-forgetting figure" in page
    assert not (out / "learning_forgetting.png").exists()


def test_report_of_nothing_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "neither a run directory" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(not CHROMIUM, reason="chromium not installed (apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(report, tmp_path):
    out = report
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", f"--screenshot={shot}", "--window-size=1200,1600",
           (out / "index.html").resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists(), "chromium wrote no screenshot"
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[0] == 1600 and img.shape[1] == 1200
    assert img[..., :3].std() > 0.05  # not a blank page: text, table and figures rendered
    # the embedded figures decoded: a large region that is neither white nor text-grey
    colourful = (img[..., :3].max(axis=-1) - img[..., :3].min(axis=-1)) > 0.3
    assert colourful.mean() > 0.002

"""Test helpers: a tiny model saved as an HF folder (with the real SmolLM2 tokenizer) and small datasets."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path


def save_tiny_model(path: Path, tokenizer, arch: str = "llama") -> Path:
    from tunelab.models.tiny import tiny_model

    model = tiny_model(arch)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i + 2, 3 * i + 1
        rows.append({"instruction": "Add the numbers.", "input": f"{a} + {b}" + " please" * (i % 4),
                     "output": f"{a} + {b} = {a + b}." + " Done." * (i % 3)})
    return rows


def write_config(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) of every training row in a run's metrics.jsonl."""
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def train_loreft_run(tmp_path, model_dir):
    """A two-step LoReFT run on a tiny model, trained through the CLI, loaded back: (model, tokenizer, template)."""
    from tunelab.cli import main
    from tunelab.export import load_run

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "run"), method="loreft",
                       model={"name": str(model_dir)}, data={"train": str(data), "max_length": 64},
                       train={"max_steps": 2, "batch_size": 2, "lr": 5e-2}, samples={"n_heldout": 0})
    assert main(["train", str(cfg)]) == 0
    return load_run(tmp_path / "run", device="cpu")


def wait_for_line(proc: subprocess.Popen, pattern: str) -> str:
    """`proc`'s output (text mode, stdout piped) up to and including the first line that matches `pattern`; kills
    `proc` and fails with what it printed when the output ends first."""
    lines = []
    deadline = time.monotonic() + 600  # a safeguard only: a loaded 2-core machine can take minutes
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return "".join(lines)
    proc.kill()
    raise AssertionError("never saw " + pattern + " in:\n" + "".join(lines))

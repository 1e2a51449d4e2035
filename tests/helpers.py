"""Test helpers: a tiny model saved as an HF folder (with the real SmolLM2 tokenizer) and small datasets."""

from __future__ import annotations

import json
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

"""Build the bundled online-RL prompt sets from `reasoning-gym` (Apache-2.0) — no network needed.

    python scripts/build_rl_data.py        # rewrites src/tunelab/assets/data/arith_{rl,heldout}.jsonl

Why arithmetic: GRPO learns only from groups whose completions score differently, so the prompts must be ones
the model sometimes gets right. SmolLM2-135M-Instruct almost never solves `gsm_symbolic` (TRL's peer run: reward
0 for all 48 completions), but it answers two-term, 1–2 digit sums some of the time. reasoning-gym's seeded
`basic_arithmetic` generator; training seeds and the held-out seed differ, and held-out questions that also
occur in the training set are removed, so nothing evaluated was trained on.
Records: {"prompt": question + instruction, "answer": gold}; the `arith` eval task scores the last number.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import reasoning_gym

OUT = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "assets" / "data"
INSTRUCTION = " Reply with just the number."


def records(seed: int, size: int) -> list[dict]:
    """`size` problems whose operands are non-negative (the generator also draws negative ones: harder)."""
    ds = reasoning_gym.create_dataset("basic_arithmetic", size=4 * size, seed=seed, min_terms=2, max_terms=2,
                                      min_digits=1, max_digits=2, operators=("+", "-"))
    rows = [{"prompt": item["question"].strip() + INSTRUCTION, "answer": str(item["answer"])} for item in ds
            if not re.search(r"(^|[\s(])-\d", item["question"])]
    return rows[:size]


def write(name: str, rows: list[dict]) -> None:
    with (OUT / name).open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    train = records(seed=1, size=512)
    seen = {r["prompt"] for r in train}
    held = [r for r in records(seed=90001, size=160) if r["prompt"] not in seen][:100]
    write("arith_rl.jsonl", train)
    write("arith_heldout.jsonl", held)
    print(len(train), len(held))

"""Build the bundled offline demo datasets from `reasoning-gym` (Apache-2.0) — no network needed.

    python scripts/build_demo_data.py      # rewrites src/tunelab/assets/data/*.jsonl

gsm_sft.jsonl: GSM8K-style word problems from reasoning-gym's seeded `gsm_symbolic` generator, each with the
generator's own worked chain-of-thought (`metadata.answer_cot`) as the response, ending in the GSM8K answer
line `#### N`. Alpaca format (instruction / input / output). Seeds 0..N-1 are training data; a disjoint seed
range is used for held-out evaluation prompts (gsm_heldout.jsonl), so nothing evaluated was trained on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import reasoning_gym

OUT = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "assets" / "data"
INSTRUCTION = "Solve the math word problem. Show your reasoning, then give the final answer after '####'."


def gsm_records(seed: int, size: int) -> list[dict]:
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    rows = []
    for item in ds:
        meta = item["metadata"]
        cot = meta.get("answer_cot")
        if not cot:
            continue
        question = re.sub(r"\s*Give (your|the) (final )?answer.*$", "", item["question"].strip(), flags=re.S)
        cot = re.sub(r"\n*(The (final )?answer is|####).*$", "", cot.strip(), flags=re.S | re.I).strip()
        rows.append({"instruction": INSTRUCTION, "input": question,
                     "output": f"{cot}\n#### {item['answer']}", "answer": str(item["answer"])})
    return rows


def write(name: str, rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / name).open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} records")


if __name__ == "__main__":
    write("gsm_sft.jsonl", gsm_records(seed=1, size=600))
    write("gsm_heldout.jsonl", gsm_records(seed=90001, size=100))

"""Build the data of the studies in examples/studies/ — offline, deterministic, from the standard library and
tunelab's bundled data.

    .venv/bin/python scripts/build_study_data.py           # rewrites examples/studies/data/*.jsonl
    .venv/bin/python scripts/build_study_data.py --scale   # also data/scale/python_train.jsonl (~all stdlib)

python_train.jsonl    continued-pretraining text ({"text", "source"}): 16 small pure-Python CPython stdlib modules
                      (PSF licence) cut at top-level statements into chunks of <= 60 lines (~65k tokens). None of
                      them is one of the held-out modules of the bundled `python_loss` task.
python_heldout.jsonl  every third chunk of the bundled python_stdlib.jsonl (colorsys, textwrap, fractions, shlex,
                      graphlib, heapq): the held-out code the code study measures, small enough to evaluate often.
gsm_answer_train.jsonl / gsm_answer_eval.jsonl
                      the bundled GSM problems with the response cut to the answer line "#### N": the same
                      instructions as gsm_sft.jsonl, ~20x longer than their responses (the masking study's
                      "long instruction, short response" regime; the bundled worked solutions are the ~1:1 one).
gsm_worked_eval.jsonl the first 24 held-out GSM problems with their worked solutions.
uuid_pairs.jsonl      24 random UUID → UUID pairs (seeded RNG, uuid4 layout), the MoRA paper's memorisation task:
                      {"instruction": key, "output": value, "answer": value}. Nothing about a value can be
                      inferred from its key, so the only way to answer is to have memorised the pair.

Rerunning the script gives byte-identical files (for a given Python version, which the code chunks record).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "examples" / "studies" / "data"
ASSETS = ROOT / "src" / "tunelab" / "assets" / "data"

# Held out: the modules of the bundled python_loss task (build_eval_data.py). Training on them would make the
# "target" loss a memorisation test.
HELDOUT_MODULES = {"colorsys", "textwrap", "fractions", "shlex", "graphlib", "heapq"}
TRAIN_MODULES = ["bisect", "calendar", "string", "glob", "fnmatch", "statistics", "functools", "queue", "sched",
                 "numbers", "copy", "pprint", "reprlib", "contextlib", "abc", "csv"]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{path.relative_to(ROOT)}: {len(rows)} records")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]


def module_chunks(name: str, max_lines: int = 60) -> list[dict]:
    """A module's source in pieces of <= max_lines, cut between top-level statements where possible."""
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{name}.py"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    tree = ast.parse("".join(lines))
    # a statement starts at its first decorator, so decorators stay with their function
    starts = sorted({0} | {min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) - 1
                           for n in tree.body})
    pieces, lo, prev = [], 0, 0
    for nxt in starts[1:] + [len(lines)]:  # greedy: grow the piece statement by statement until it overflows
        if nxt - lo > max_lines and prev > lo:
            pieces.append((lo, prev))
            lo = prev
        prev = nxt
    pieces.append((lo, len(lines)))
    version = ".".join(map(str, sys.version_info[:3]))
    rows = []
    for a, b in pieces:
        for s in range(a, b, max_lines):  # one definition longer than max_lines: cut it plainly
            text = "".join(lines[s:min(b, s + max_lines)])
            if text.strip():
                rows.append({"text": text, "source": f"CPython {version} Lib/{name}.py:{s + 1}"})
    return rows


def all_pure_python_modules() -> list[str]:
    """Every top-level pure-Python stdlib module except the held-out ones and tests (for --scale)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.stem for p in lib.glob("*.py") if not p.stem.startswith(("test", "_test", "__")))
    return [n for n in names if n not in HELDOUT_MODULES and n != "this"]


def code_data(scale: bool) -> None:
    assert not HELDOUT_MODULES & set(TRAIN_MODULES)
    write(OUT / "python_train.jsonl", [r for m in TRAIN_MODULES for r in module_chunks(m)])
    held = read(ASSETS / "python_stdlib.jsonl")
    write(OUT / "python_heldout.jsonl", held[::3])
    if scale:
        rows = []
        for m in all_pure_python_modules():
            try:
                rows += module_chunks(m)
            except (SyntaxError, UnicodeDecodeError):
                continue
        write(OUT / "scale" / "python_train.jsonl", rows)


def answer_only(row: dict) -> dict:
    return {**row, "output": f"#### {row['answer']}"}


def gsm_data() -> None:
    write(OUT / "gsm_answer_train.jsonl", [answer_only(r) for r in read(ASSETS / "gsm_sft.jsonl")])
    held = read(ASSETS / "gsm_heldout.jsonl")[:24]
    write(OUT / "gsm_answer_eval.jsonl", [answer_only(r) for r in held])
    write(OUT / "gsm_worked_eval.jsonl", held)


def uuid_pairs(n: int = 24, seed: int = 2024) -> list[dict]:
    rng = random.Random(seed)  # uuid.uuid4() reads os.urandom: not reproducible, so draw the 128 bits ourselves

    def draw() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    rows = [{"instruction": draw(), "output": (v := draw()), "answer": v} for _ in range(n)]
    assert len({r["instruction"] for r in rows}) == n
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", action="store_true", help="also build the large code set for the `scale:` runs")
    args = ap.parse_args()
    code_data(args.scale)
    gsm_data()
    write(OUT / "uuid_pairs.jsonl", uuid_pairs())


if __name__ == "__main__":
    main()

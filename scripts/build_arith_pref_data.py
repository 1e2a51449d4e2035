"""Build the fixed preference pairs of the DPO-vs-PPO study (examples/studies/dpo_vs_ppo.yaml) — offline, seeded.

    python scripts/build_arith_pref_data.py                 # SmolLM2-135M-Instruct, 80 prompts × 8 samples
    python scripts/build_arith_pref_data.py --model PATH --prompts 8 --samples 4 --out DIR   # a smoke run

Both sets use the same prompts: the first N of a seeded shuffle of the bundled training prompts
(``assets/data/arith_rl.jsonl``; the held-out ``arith`` task's problems are not among them).

``arith_pairs_policy.jsonl``  *in-distribution* (Xu et al. 2024, "Is DPO Superior to PPO", §4): for each prompt,
    S completions sampled from the starting model exactly as the online runs sample (temperature 0.7,
    32 new tokens, the chat template's end of turn stops), scored by the study's reward (exact match of the last
    number); chosen = the first correct sample, rejected = the first wrong one. Prompts the model always or
    never solves give no pair. N·S completions are sampled: with N = 80, S = 8 that is the 640 completions every
    online variant of the study samples during training (the matched sampling budget).
``arith_pairs_ood.jsonl``  *out-of-distribution*: the same prompts, responses written in a fixed style the model
    does not produce — chosen "The answer is <gold>." against rejected "The answer is <gold ± k>." (k = 1–3, seeded).
``arith_sft_ood.jsonl``  the OOD pairs' chosen responses as prompt/completion records (the SFT stage of the
    "SFT on the preferred responses, then DPO" variant; a preference file in an SFT stage would do the same).

Deterministic: the prompt shuffle, the wrong answers and the sampler are seeded (the sampler on a CPU gives the
same completions run after run; another device or library version may differ in the last digits of a logit).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "src" / "tunelab" / "assets" / "data" / "arith_rl.jsonl"
OUT = ROOT / "examples" / "studies" / "data"
SEED = 1234


def prompts(n: int) -> list[dict]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    random.Random(SEED).shuffle(rows)
    return rows[:n]


def ood_pairs(rows: list[dict]) -> list[dict]:
    rng = random.Random(SEED + 1)
    out = []
    for r in rows:
        wrong = int(r["answer"]) + rng.choice([-3, -2, -1, 1, 2, 3])
        out.append({"prompt": r["prompt"], "chosen": f"The answer is {r['answer']}.",
                    "rejected": f"The answer is {wrong}.", "answer": r["answer"]})
    return out


def policy_pairs(rows: list[dict], model_ref: str, samples: int) -> tuple[list[dict], dict]:
    import torch

    from tunelab.data.formats import prompt_of
    from tunelab.data.sources import Record
    from tunelab.data.templates import get_template
    from tunelab.eval.exact import is_correct
    from tunelab.generate import cut_at_stop
    from tunelab.models.load import load_model
    from tunelab.sampling import sample

    torch.manual_seed(SEED)
    model, tok = load_model(model_ref, "auto", "cpu")
    template = get_template("auto", tok)
    stops = [s for s in template.stop_strings if s]
    stop_ids = [i for s in stops if (i := tok.convert_tokens_to_ids(s)) is not None and i != tok.unk_token_id]
    ids = [tok(template.generation_prompt(prompt_of(Record(r, f"arith_rl:{i}"))), add_special_tokens=False)["input_ids"]
           for i, r in enumerate(rows)]
    out = sample(model, tok, ids, n=samples, temperature=0.7, max_new_tokens=32, stop_token_ids=stop_ids,
                 stop_strings=stops, seed=SEED, batch_size=64)
    texts = [cut_at_stop(tok.decode(c, skip_special_tokens=True), stops).strip() for c in out.completions()]
    pairs, solved = [], 0
    for p, r in enumerate(rows):
        group = texts[p * samples:(p + 1) * samples]
        ok = [is_correct(t, r["answer"], "last_number")[0] for t in group]
        solved += sum(ok)
        good = next((t for t, k in zip(group, ok) if k), None)
        bad = next((t for t, k in zip(group, ok) if not k), None)
        if good is not None and bad is not None:
            pairs.append({"prompt": r["prompt"], "chosen": good, "rejected": bad, "answer": r["answer"]})
    return pairs, {"sampled": len(texts), "correct": solved, "pairs": len(pairs)}


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=80)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--skip-sampling", action="store_true", help="write only the OOD files (no model needed)")
    a = ap.parse_args(argv)
    out, rows = Path(a.out), prompts(a.prompts)
    ood = ood_pairs(rows)
    write(out / "arith_pairs_ood.jsonl", ood)
    write(out / "arith_sft_ood.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in ood])
    if not a.skip_sampling:
        pairs, stats = policy_pairs(rows, a.model, a.samples)
        write(out / "arith_pairs_policy.jsonl", pairs)
        print(json.dumps(stats))


if __name__ == "__main__":
    main()

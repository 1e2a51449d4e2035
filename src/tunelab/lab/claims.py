"""A study's claims, budgets and provenance, computed from its runs (`lab.stats` does the statistics).

A claim ``{better: A, than: B, on: TASK}`` reads: after training, variant A scores better than variant B on TASK.
It is tested on the per-item scores every run writes (``eval/<TASK>.items.jsonl``, phase ``after``): the items
both variants scored, at the seeds both finished, paired by (seed, item). Each item's score is the task's
primary metric for that item — exact match or acc_norm (0/1), pass@k of the problem, a document's mean token
loss (lower is better; per document, each document counting once, which is not the token-weighted loss of the
run's summary). ``direction:`` overrides the task's own direction.

Outcome per claim: **matched** (the verdict is ``A better``), **contradicted** (``B better``) or **inconclusive**;
with a declared ``margin:`` (the smallest difference that matters, in the score's units) also **negligible**: the
difference is confidently smaller than the margin (`lab.stats`). A real difference whose interval still reaches
below the margin stays inconclusive, with ``below_margin`` set so the text can say why. **not run** when either
side has no finished run with the task's items (left out of the Holm family).

Budgets (`budget_rows`): per variant, the mean over its seeds of what each run consumed (``results.json
["budget"]``, a pipeline's stages summed) and, with `configured`, what the resolved config asks for
(`train.accounting.configured`, plus a variant's declared outside ``budget:``). `match_problem` is the check
`tunelab compare` runs before training: configured budgets differing by more than 5 % on a matched quantity.
A variant that spends none of a quantity (an offline objective samples no completions) is left out of that
quantity's match — the budget table still shows its 0; a variant that sampled its training pairs beforehand
declares them (``budget: {completions_sampled: 640}`` in the study) and is matched.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import TunelabError
from ..jsonl import read_rows
from ..machine import describe, same_setup_key
from .stats import ALPHA, MIN_SEEDS, compare_paired, decide, mean_ci

MATCH_TOLERANCE = 0.05
_BUDGET_COLUMNS = ("steps", "sequences_trained", "tokens_trained", "completions_sampled", "tokens_sampled",
                   "reward_model_calls", "flops_train", "flops_sampling", "flops", "wall_seconds", "cpu_seconds",
                   "peak_rss_mb", "invocations")


# ----------------------------------------------------------------------------------------------- validation
def claim_lines(path: Path | None) -> list[int | None]:
    """The 1-based line of each entry of the sweep file's ``claims:`` list (None when unknown)."""
    if path is None:
        return []
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return []
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            if k.value == "claims" and isinstance(v, yaml.SequenceNode):
                return [item.start_mark.line + 1 for item in v.value]
    return []


def variant_tasks(raw: dict) -> set[str]:
    """Names of the eval tasks a variant's (unvalidated) config declares, its stages' included."""
    from ..eval import load_task

    lists = [raw.get("eval") or {}] + [st.get("eval") or {} for st in raw.get("stages") or [] if isinstance(st, dict)]
    names = set()
    for ev in lists:
        for t in [*(ev.get("target") or []), *(ev.get("source") or [])]:
            try:
                names.add(t[len("harness:"):] if str(t).startswith("harness:") else load_task(t).name)
            except TunelabError:
                pass  # the variant's own validation reports a broken task; here only names matter
    return names


def check_claims(sweep) -> None:
    """Every claim names known variants and a task both evaluate; one ``file:line`` error otherwise."""
    if not sweep.claims:
        return
    lines = claim_lines(sweep.path)
    by_name: dict[str, dict] = {}
    for v in sweep.variants:
        by_name.setdefault(v.name, v.raw)
    for i, c in enumerate(sweep.claims):
        where = f"{sweep.path or 'sweep'}:{lines[i]}" if i < len(lines) and lines[i] else \
            f"{sweep.path or 'sweep'}: claims[{i}]"
        for side in (c.better, c.than):
            if side not in by_name:
                raise TunelabError(f"{where}: claim names unknown variant '{side}' (variants: "
                                   f"{', '.join(by_name)})")
        if c.better == c.than:
            raise TunelabError(f"{where}: a claim compares two different variants")
        for side in (c.better, c.than):
            tasks = variant_tasks(by_name[side])
            if c.on not in tasks:
                raise TunelabError(f"{where}: variant '{side}' does not evaluate task '{c.on}' (its tasks: "
                                   f"{', '.join(sorted(tasks)) or 'none'})")


# ---------------------------------------------------------------------------------------------- run data
def _stage_dirs(run_dir: Path) -> list[Path]:
    try:
        stages = (yaml.safe_load((run_dir / "pipeline.yaml").read_text()) or {}).get("stages", [])
    except (OSError, yaml.YAMLError):
        return []
    return [run_dir / str(st.get("name", f"stage{i + 1}")) for i, st in enumerate(stages)]


def items_file(run_dir: Path, task: str) -> Path | None:
    """``eval/<task>.items.jsonl`` of a run, or of a pipeline's last stage that has one."""
    name = f"{task.replace('/', '_')}.items.jsonl"
    for d in [Path(run_dir), *reversed(_stage_dirs(Path(run_dir)))]:
        if (d / "eval" / name).exists():
            return d / "eval" / name
    return None


def load_items(run_dir: Path, task: str, phase: str = "after") -> dict[str, float]:
    """item id → score for one task and phase ({} when the run has no per-item file for it)."""
    path = items_file(run_dir, task)
    if path is None:
        return {}
    return {r["id"]: float(r["score"]) for r in read_rows(path) if r.get("phase", "after") == phase
            and isinstance(r.get("score"), (int, float))}


def task_direction(run_dir: Path, task: str) -> bool | None:
    """Higher is better for the task's primary metric, from the run's results.json (None when unknown)."""
    for d in [Path(run_dir), *reversed(_stage_dirs(Path(run_dir)))]:
        try:
            res = json.loads((d / "results.json").read_text())
        except (OSError, ValueError):
            continue
        for section in ("learning", "forgetting"):
            delta = (res.get(section) or {}).get(task) if isinstance(res.get(section), dict) else None
            if isinstance(delta, dict) and "higher_is_better" in delta:
                return bool(delta["higher_is_better"])
    return None


def run_budget(run) -> dict:
    """What a run consumed: its results.json ``budget`` (a pipeline: its stages' budgets summed)."""
    res = run.results or {}
    if isinstance(res.get("budget"), dict):
        return res["budget"]
    total: dict = {}
    for d in _stage_dirs(run.path):
        try:
            b = json.loads((d / "results.json").read_text()).get("budget") or {}
        except (OSError, ValueError):
            continue
        for k, v in b.items():
            if isinstance(v, (int, float)):
                total[k] = max(total.get(k, 0), v) if k == "peak_rss_mb" else total.get(k, 0) + v
    return total


def provenance_of(run) -> dict | None:
    res = run.results or {}
    if isinstance(res.get("provenance"), dict):
        return res["provenance"]
    for d in reversed(_stage_dirs(run.path)):
        try:
            return json.loads((d / "results.json").read_text()).get("provenance")
        except (OSError, ValueError):
            continue
    return None


def by_variant(runs) -> dict[str, dict[int, object]]:
    """{variant: {seed: finished RunInfo}} (a run outside a sweep: its label, its config's train.seed)."""
    out: dict[str, dict[int, object]] = {}
    for r in runs:
        if r.status != "done":
            continue
        seed = r.seed if r.seed is not None else int(((r.config or {}).get("train") or {}).get("seed", 0) or 0)
        out.setdefault(r.variant or r.label, {})[seed] = r
    return out


# ------------------------------------------------------------------------------------------------ claims
def evaluate_claims(runs, claims: list, alpha: float = ALPHA, n_resamples: int = 10_000) -> list[dict]:
    """One row per claim (see the module docstring); Holm across the claims that could be computed."""
    groups = by_variant(runs)
    rows, computed = [], []
    for c in claims:
        c = c if isinstance(c, dict) else c.model_dump()
        row = {"better": c["better"], "than": c["than"], "on": c["on"], "expected": c.get("expected", ""),
               "direction": c.get("direction"), "margin": c.get("margin"), "outcome": "not run"}
        rows.append(row)
        a_runs, b_runs = groups.get(c["better"], {}), groups.get(c["than"], {})
        seeds = sorted(set(a_runs) & set(b_runs))
        a_items = {s: load_items(a_runs[s].path, c["on"]) for s in seeds}
        b_items = {s: load_items(b_runs[s].path, c["on"]) for s in seeds}
        seeds = [s for s in seeds if a_items[s] and b_items[s]]
        if not seeds:
            row["why"] = "no finished runs of both variants with per-item scores for this task"
            continue
        ids = sorted(set.intersection(*[set(a_items[s]) & set(b_items[s]) for s in seeds]))
        if not ids:
            row["why"] = "the two variants share no scored items"
            continue
        higher = {"higher": True, "lower": False}.get(c.get("direction") or "")
        if higher is None:
            found = task_direction(a_runs[seeds[0]].path, c["on"])
            higher = True if found is None else found
        row["direction"] = "higher" if higher else "lower"
        a = [[a_items[s][i] for i in ids] for s in seeds]
        b = [[b_items[s][i] for i in ids] for s in seeds]
        res = compare_paired(a, b, higher_is_better=higher, n_resamples=n_resamples, alpha=alpha,
                             margin=c.get("margin"))
        row.update(seeds=seeds, mean_better=[sum(x) / len(x) for x in a], mean_than=[sum(x) / len(x) for x in b])
        computed.append((row, res))
    decide([r for _, r in computed], alpha)
    for row, res in computed:
        row.update(res.as_dict())
        row["outcome"] = {"A better": "matched", "B better": "contradicted",
                          "negligible": "negligible"}.get(res.verdict, "inconclusive")
        row["below_margin"] = row["outcome"] == "inconclusive" and res.n_seeds >= MIN_SEEDS \
            and res.direction(alpha) != 0  # real, but not shown to clear the margin
        row["better_ci"] = mean_ci(row["mean_better"])
        row["than_ci"] = mean_ci(row["mean_than"])
    return rows


# ----------------------------------------------------------------------------------------------- budgets
def budget_rows(runs, configured: dict[str, dict] | None = None) -> list[dict]:
    """Per variant: seeds finished and the mean consumed budget over them (+ ``configured:<q>`` columns)."""
    rows = []
    for name, seeds in by_variant(runs).items():
        row = {"variant": name, "seeds": len(seeds)}
        budgets = [run_budget(r) for r in seeds.values()]
        for q in _BUDGET_COLUMNS:
            vals = [b[q] for b in budgets if isinstance(b.get(q), (int, float))]
            row[q] = sum(vals) / len(vals) if vals else None
        for q, v in ((configured or {}).get(name) or {}).items():
            row[f"configured:{q}"] = v
        rows.append(row)
    return rows


def match_problem(configured: dict[str, dict], match: list[str], tolerance: float = MATCH_TOLERANCE) -> str | None:
    """The first matched quantity whose configured values differ by more than `tolerance`, as one sentence."""
    for q in match:
        values = {name: b.get(q) for name, b in configured.items() if b.get(q) != 0}  # 0: does not spend q
        unknown = [n for n, v in values.items() if v is None]
        if unknown:
            needs = "set train.max_steps, or unpacked local data"
            if q.startswith("flops"):  # the parameter counts come from the model's config.json
                needs += "; and a model whose config.json is readable before training"
            return (f"match: {q}: the configured budget of variant '{unknown[0]}' cannot be computed before training "
                    f"({needs})")
        if len(values) < 2:
            continue
        lo, hi = min(values, key=values.get), max(values, key=values.get)
        if values[hi] > (1 + tolerance) * values[lo]:
            return (f"match: {q}: configured budgets differ by more than {tolerance:.0%} — '{lo}' "
                    f"{_amount(values[lo])} vs '{hi}' {_amount(values[hi])}")
    return None


def _amount(v: float) -> str:
    """A count as written (2, 1,536), a FLOP count in three significant digits (7.64e+09)."""
    return f"{v:.3g}" if abs(v) >= 1e9 else f"{v:,.0f}"


# -------------------------------------------------------------------------------------------- provenance
def provenance_summary(runs) -> tuple[str, list[str]]:
    """(one line describing the setup of the finished runs, warnings when they came from different setups)."""
    provs = [(r.label, provenance_of(r)) for r in runs if r.status == "done"]
    provs = [(label, p) for label, p in provs if p]
    if not provs:
        return "provenance not recorded", []
    setups: dict[tuple, list[str]] = {}
    for label, p in provs:
        setups.setdefault(same_setup_key(p), []).append(label)
    line = describe(provs[0][1])
    if len(setups) == 1:
        return line, []
    groups = sorted(setups.values(), key=len, reverse=True)
    return line, [f"runs of this study came from {len(setups)} different versions/machines (e.g. "
                  f"{groups[0][0]} vs {groups[1][0]}): compare with care"]

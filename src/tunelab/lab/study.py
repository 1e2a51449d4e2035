"""A study's verdicts as text: the claims table, the per-variant means, the budget table and the provenance line —
in Markdown (results.md, the README) and HTML (index.html). Nothing here computes a statistic (`lab.claims`).

The README's study sections are generated, never hand-written::

    tunelab report runs/studies/dpo_vs_ppo --markdown                # print the block
    tunelab report runs/studies/dpo_vs_ppo --markdown README.md      # replace it in README.md, in place

The block sits between ``<!-- study:NAME -->`` and ``<!-- /study:NAME -->``; `replace_block` rewrites only
what is between the markers (and refuses, one line, when the file lacks them — add them where the section goes).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from ..errors import TunelabError
from .claims import budget_rows, evaluate_claims, provenance_summary
from .numbers import fmt_ci
from .stats import MIN_SEEDS

_BUDGET_HEADERS = (("seeds", "seeds"), ("steps", "steps"), ("tokens_trained", "tokens trained"),
                   ("completions_sampled", "completions sampled"), ("tokens_sampled", "tokens sampled"),
                   ("flops_train", "FLOPs train"), ("flops_sampling", "FLOPs sampling"),
                   ("wall_seconds", "wall s"), ("cpu_seconds", "CPU s"), ("peak_rss_mb", "peak RSS MB"),
                   ("invocations", "invocations"))


def _num(v, signed: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and abs(v) >= 1e6:
        return f"{v:.3g}"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:+.3f}" if signed else f"{v:.3g}"
    return f"{int(v):+,}" if signed else f"{int(v):,}"


def claim_text(row: dict) -> str:
    arrow = {"higher": "↑", "lower": "↓"}.get(row.get("direction") or "", "")
    margin = f" (margin {row['margin']:g})" if row.get("margin") else ""
    return f"{row['better']} > {row['than']} on {row['on']}{' ' + arrow if arrow else ''}{margin}"


def measured(row: dict) -> str:
    if row.get("diff") is None:
        return "—"
    return f"{row['diff']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def per_seed_text(row: dict) -> str:
    """Each seed's mean Δ (oriented like Δ: > 0 favours the claim's first variant); a verdict needs them all on
    its side, so an "inconclusive" next to a small p is read off this column."""
    seeds = row.get("per_seed")
    return ", ".join(f"{x:+.3f}" for x in seeds) if seeds else "—"


def mdd_text(row: dict) -> str:
    mdd = row.get("mdd")
    if mdd is None:
        return "—"
    return "∞ (too few items)" if mdd == float("inf") else f"{mdd:.3f}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


MARGIN_NOTE = ("; a claim's declared margin is the smallest Δ that matters: a verdict's CI must clear it, and a Δ "
               "confidently inside it is negligible (two one-sided tests, Bonferroni across the claims)")


def _any_margin(parts: dict) -> bool:
    return any(r.get("margin") for r in parts["claims"])


def outcome_text(row: dict) -> str:
    """The verdict cell: ``inconclusive (1 seed)`` says why when one seed was all there was (`stats.MIN_SEEDS`)."""
    short = row.get("n_seeds") is not None and row["n_seeds"] < MIN_SEEDS and row["outcome"] == "inconclusive"
    if short:
        return f"{row['outcome']} ({row['n_seeds']} seed)"
    if row["outcome"] == "negligible":
        return f"negligible (|Δ| < {row['margin']:g})"
    if row.get("below_margin"):  # a real difference, not shown to reach the declared margin
        return f"inconclusive (real, may be < {row['margin']:g})"
    return row["outcome"]


def progress_line(parts: dict) -> str:
    """``In progress: 1 of 3 seeds finished (every variant)`` while a study with declared seeds is incomplete."""
    declared = parts.get("seeds")
    n = len(declared) if isinstance(declared, (list, tuple)) else declared
    if not n or not parts["budgets"] or all(r["seeds"] >= n for r in parts["budgets"]):
        return ""
    counts = {r["variant"]: r["seeds"] for r in parts["budgets"]}
    if len(set(counts.values())) == 1:
        done = f"{next(iter(counts.values()))} of {n} seeds finished (every variant)"
    else:
        done = f"seeds finished (of {n}): " + ", ".join(f"{v} {k}" for v, k in counts.items())
    return f"In progress: {done}; the verdicts are recomputed as seeds finish (one seed gives none)."


def claim_line(row: dict) -> str:
    """One line per claim for the terminal: ``claim: A > B on T ↑ · Δ +0.03 [−0.02, +0.08] · …``."""
    if row.get("diff") is None:
        return f"claim: {claim_text(row)} → not run ({row.get('why', '')})"
    return (f"claim: {claim_text(row)} · Δ {measured(row)} · per seed {per_seed_text(row)} · "
            f"p(Holm) {row['p_holm']:.3g} · MDD {mdd_text(row)} · n={row['n_items']}×{row['n_seeds']} seeds → "
            f"{outcome_text(row)}")


def claims_markdown(rows: list[dict]) -> str:
    head = ("| claim (paper's direction) | paper | measured Δ (95 % CI) | Δ per seed | p (Holm) | MDD | "
            "n items × seeds | verdict |\n|---|---|---:|---:|---:|---:|---:|---|\n")
    body = []
    for r in rows:
        cells = [claim_text(r), r.get("expected") or "—", measured(r), per_seed_text(r),
                 f"{r['p_holm']:.3g}" if r.get("p_holm") is not None else "—",
                 mdd_text(r),
                 f"{r['n_items']} × {r['n_seeds']}" if r.get("n_items") else "—", f"**{outcome_text(r)}**"]
        body.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return head + "\n".join(body) + "\n"


def variant_means(rows: list[dict]) -> list[tuple[str, str, tuple]]:
    """(variant, task, (mean, low, high)) for every variant × task a claim involves, each once."""
    out, seen = [], set()
    for r in rows:
        for side, key in ((r["better"], "better_ci"), (r["than"], "than_ci")):
            if r.get(key) and (side, r["on"]) not in seen:
                seen.add((side, r["on"]))
                out.append((side, r["on"], r[key]))
    return out


def means_markdown(rows: list[dict]) -> str:
    means = variant_means(rows)
    if not means:
        return ""
    kinds = {(side, r["on"]): "loss" if r.get("direction") == "lower" else "float"
             for r in rows for side in (r["better"], r["than"])}
    lines = ["| variant | task | mean over seeds ± 95 % t half-width |", "|---|---|---:|"]
    for v, t, (m, lo, hi) in means:
        lines.append(f"| {v} | {t} | {fmt_ci(m, lo, hi, kinds[(v, t)])}" + (" (1 seed)" if lo is None else "") + " |")
    return "\n".join(lines) + "\n"


def budget_columns(match: list[str] = ()) -> list[tuple[str, str]]:
    """The budget table's columns: what each run consumed, then the configured value of each matched quantity
    (it includes what a variant declared it consumed outside its run)."""
    return list(_BUDGET_HEADERS) + [(f"configured:{q}", f"{q.replace('_', ' ')} (configured)") for q in match]


def budget_markdown(rows: list[dict], match: list[str] = ()) -> str:
    if not rows:
        return ""
    cols = budget_columns(match)
    head = "| variant | " + " | ".join(h for _, h in cols) + " |\n|---|" + "---:|" * len(cols)
    body = ["| " + r["variant"] + " | " + " | ".join(_num(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return head + "\n" + "\n".join(body) + "\n"


def study_seconds(rows: list[dict]) -> tuple[float, float]:
    """(wall, CPU) seconds of the whole study: Σ over variants of the mean per run × finished seeds (each run's
    own seconds already sum its invocations, `train.accounting`)."""
    wall = sum((r.get("wall_seconds") or 0) * r["seeds"] for r in rows)
    cpu = sum((r.get("cpu_seconds") or 0) * r["seeds"] for r in rows)
    return wall, cpu


def study_time_line(parts: dict) -> str:
    """``the whole study: Σ runs 12.0 min wall, 20.1 min CPU; tunelab compare ran 13.2 min in 2 invocations`` —
    the runs' sum, and the study's own elapsed wall time (sweep.json: evaluation, reports and restarts included)."""
    wall, cpu = study_seconds(parts["budgets"])
    line = f"the whole study: Σ runs {_hours(wall)} wall, {_hours(cpu)} CPU"
    if parts.get("elapsed") is not None:
        n = parts.get("invocations") or 1
        line += f"; tunelab compare ran {_hours(parts['elapsed'])} in {n} invocation{'s' if n != 1 else ''}"
    return line


def study_parts(runs, study: dict | None) -> dict:
    """Everything the study sections show: claim rows, budget rows, provenance line and warnings."""
    study = study or {}
    claims = evaluate_claims(runs, study.get("claims") or []) if study.get("claims") else []
    budgets = budget_rows(runs, study.get("configured_budgets"))
    line, warnings = provenance_summary(runs)
    return {"claims": claims, "budgets": budgets, "provenance": line, "warnings": warnings,
            "match": study.get("match") or [], "seeds": study.get("seeds"),
            "elapsed": study.get("wall_seconds"), "invocations": study.get("invocations")}


def study_markdown(runs, study: dict | None, name: str, source: str = "") -> str:
    """The README block (markers included) for one study."""
    parts = study_parts(runs, study)
    out = [f"<!-- study:{name} -->",
           f"*Generated by `tunelab report {source or '<study folder>'} --markdown` — do not edit by hand. "
           "Verdicts: paired bootstrap CI (10k resamples) and paired test over items × seeds, Holm-adjusted across "
           "the study's claims (`tunelab/lab/stats.py`); a verdict also needs ≥ 2 seeds, every seed's Δ on its "
           "side (Δ per seed; > 0 favours the first variant); MDD = smallest difference this study detects with 80 % power"
           f"{MARGIN_NOTE if _any_margin(parts) else ''}.*",
           ""]
    progress = progress_line(parts)
    if progress:
        out += [f"**{progress}**", ""]
    if parts["claims"]:
        out += [claims_markdown(parts["claims"]), means_markdown(parts["claims"])]
    else:
        out += ["No claims declared.", ""]
    if parts["budgets"]:
        match = f" (matched: {', '.join(parts['match'])})" if parts["match"] else ""
        out += [f"Budget per run, mean over seeds{match}; {study_time_line(parts)}:",
                "", budget_markdown(parts["budgets"], parts["match"])]
    out.append(f"Provenance: {parts['provenance']}")
    out += [f"\n**Warning:** {w}" for w in parts["warnings"]]
    out.append(f"<!-- /study:{name} -->")
    return "\n".join(out) + "\n"


def replace_block(path: Path, name: str, block: str) -> None:
    """Replace the ``<!-- study:NAME -->…<!-- /study:NAME -->`` block of `path` (written to a temp file, renamed)."""
    text = Path(path).read_text(encoding="utf-8")
    pattern = re.compile(rf"<!-- study:{re.escape(name)} -->.*?<!-- /study:{re.escape(name)} -->\n?", re.S)
    if not pattern.search(text):
        raise TunelabError(f"{path}: no '<!-- study:{name} -->' … '<!-- /study:{name} -->' markers; add them where "
                           "the study's section goes")
    new = pattern.sub(lambda _: block, text, count=1)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)


def study_html(parts: dict) -> str:
    """The claims, per-variant means, budget table and provenance for index.html."""
    e = lambda s: html.escape(str(s), quote=True)  # noqa: E731
    out = []
    for w in parts["warnings"]:
        out.append(f"<p class='err'>{e(w)}</p>")
    progress = progress_line(parts)
    if progress:
        out.append(f"<p><b>{e(progress)}</b></p>")
    if parts["claims"]:
        out.append("<h2>Claims</h2><table><thead><tr><th class='t'>claim</th><th class='t'>paper</th><th>Δ (95 % CI)"
                   "</th><th>Δ per seed</th><th>p (Holm)</th><th>MDD</th><th>n × seeds</th>"
                   "<th class='t'>verdict</th></tr></thead>"
                   "<tbody>")
        for r in parts["claims"]:
            cls = {"matched": "pos", "contradicted": "neg"}.get(r["outcome"], "")
            p = f"{r['p_holm']:.3g}" if r.get("p_holm") is not None else "—"
            mdd = mdd_text(r)
            n = f"{r['n_items']} × {r['n_seeds']}" if r.get("n_items") else "—"
            cells = [claim_text(r), r.get("expected") or "—", measured(r), per_seed_text(r), p, mdd, n]
            out.append("<tr>" + "".join(f"<td class='{'t' if i < 2 else ''}'>{e(c)}</td>" for i, c in enumerate(cells))
                       + f"<td class='t {cls}'><b>{e(outcome_text(r))}</b></td></tr>")
        out.append("</tbody></table><p class='note'>Paired bootstrap CI and paired test over items × seeds, "
                   "Holm-adjusted across the claims; a verdict also needs ≥ 2 seeds, every one agreeing"
                   f"{e(MARGIN_NOTE) if _any_margin(parts) else ''} (lab/stats.py).</p>")
    if parts["budgets"]:
        cols = budget_columns(parts["match"])
        heads = "".join(f"<th>{e(h)}</th>" for _, h in cols)
        out.append(f"<h2>Budgets</h2><table><thead><tr><th class='t'>variant</th>{heads}</tr></thead><tbody>")
        for r in parts["budgets"]:
            out.append(f"<tr><td class='t'>{e(r['variant'])}</td>"
                       + "".join(f"<td>{e(_num(r.get(k)))}</td>" for k, _ in cols) + "</tr>")
        out.append(f"</tbody></table><p class='note'>Per run, mean over seeds; {e(study_time_line(parts))}.</p>")
    out.append(f"<p class='note'>Provenance: {e(parts['provenance'])}</p>")
    return "\n".join(out)

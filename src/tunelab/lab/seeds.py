"""What the report compares: variants, each the mean over its seeds.

A study with ``seeds:`` runs every variant once per seed (``runs/<variant>/seed-<k>``, `lab.sweep`). One seed is one
draw of the training noise, so the figures and the variant table show each variant's **mean over its seeds with
the 95 % t interval** of `lab.stats.mean_ci` (mean ± t_{.975, S−1} · sd / √S over the S seeds that have the value;
no interval for one seed) — never one seed standing for the variant. Runs without seeds are groups of one: their
value, no interval. Curves average the seeds step by step (the steps a seed logged; the interval where ≥ 2 seeds
logged that step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .numbers import fmt_ci
from .results import Column, RunInfo
from .stats import mean_ci

Stat = tuple[float, float | None, float | None]  # (mean, low, high) — low/high None without an interval


@dataclass
class Group:
    """One variant: its runs (one per seed, or the single run of a report without seeds)."""

    name: str
    runs: list[RunInfo] = field(default_factory=list)

    @property
    def seeded(self) -> bool:
        return any(r.seed is not None for r in self.runs)


def group_runs(runs: list[RunInfo]) -> list[Group]:
    """Runs grouped by variant, in the order of each variant's first run; a run without a seed is its own group."""
    groups: dict[str, Group] = {}
    for r in runs:
        name = r.variant if r.seed is not None and r.variant else r.label
        groups.setdefault(name, Group(name)).runs.append(r)
    return list(groups.values())


def has_seeds(runs: list[RunInfo]) -> bool:
    return any(r.seed is not None for r in runs)


def stat(values) -> Stat | None:
    """Mean over seeds and its 95 % t interval of the finite numbers in `values` (None when there is none)."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return mean_ci(xs) if xs else None


def group_stat(group: Group, get: Callable[[RunInfo], float | None]) -> Stat | None:
    return stat(get(r) for r in group.runs)


def half_width(s: Stat | None) -> float | None:
    """Half the 95 % interval (for symmetric error bars), None without one."""
    if s is None or s[1] is None or s[2] is None:
        return None
    return (s[2] - s[1]) / 2


def mean_curve(group: Group, points: Callable[[RunInfo], list[tuple[float, float]]]) -> list[tuple[float, Stat]]:
    """[(step, (mean, low, high))] over the group's runs, for every step at least one run logged."""
    by_step: dict[float, list[float]] = {}
    for r in group.runs:
        for step, value in points(r):
            by_step.setdefault(step, []).append(value)
    return [(step, mean_ci(vals)) for step, vals in sorted(by_step.items())]


# ------------------------------------------------------------------------------------------- variant table
_NUMERIC = ("int", "float", "loss", "pct", "percent", "reward", "signed", "params", "seconds")


def variant_rows(cols: list[Column], rows: list[dict], runs: list[RunInfo]) -> list[dict]:
    """One row per variant: numeric columns as `Stat` over its seeds, text columns kept when every seed agrees,
    ``seeds``: how many seed runs finished (of how many)."""
    by_label = {r.label: row for r, row in zip(runs, rows)}
    out = []
    for g in group_runs(runs):
        members = [by_label[r.label] for r in g.runs]
        row: dict = {"variant": g.name,
                     "seeds": f"{sum(r.status == 'done' for r in g.runs)}/{len(g.runs)}"}
        for c in cols:
            if c.key == "variant":
                continue
            if c.kind in _NUMERIC:
                row[c.key] = stat(m.get(c.key) for m in members)
            else:
                vals = {str(m.get(c.key)) for m in members if m.get(c.key) is not None}
                row[c.key] = vals.pop() if len(vals) == 1 else ("mixed" if vals else None)
        out.append(row)
    return out


def variant_cell(value, kind: str) -> str:
    if isinstance(value, tuple):
        return fmt_ci(*value, kind=kind)
    return fmt_ci(value, kind=kind if kind not in _NUMERIC else "text")


def variant_table(cols: list[Column], rows: list[dict], runs: list[RunInfo]) -> tuple[list[Column], list[dict]]:
    """The variant table: `variant_rows`, and the per-run table's columns with ``seeds done`` after the name,
    without ``status`` and without a config column that differs only between seeds (``train.seed``)."""
    vrows = variant_rows(cols, rows, runs)
    vcols = [c for c in cols if c.key != "status" and not (c.key.startswith("cfg:") and all(
        r.get(c.key) in ("mixed", None) for r in vrows))]
    return vcols[:1] + [Column("seeds", "seeds done", "text")] + vcols[1:], vrows


def variant_markdown(cols: list[Column], rows: list[dict], runs: list[RunInfo]) -> str:
    """The variant table in Markdown: every number is ``mean ± half-width`` of its 95 % t interval over seeds."""
    vcols, vrows = variant_table(cols, rows, runs)
    head = "| " + " | ".join(c.header.replace("|", "\\|") for c in vcols) + " |"
    rule = "|" + "|".join("---" if c.kind == "text" else "---:" for c in vcols) + "|"
    body = ["| " + " | ".join(variant_cell(row.get(c.key), c.kind).replace("|", "\\|") for c in vcols) + " |"
            for row in vrows]
    return "\n".join([head, rule, *body]) + "\n"

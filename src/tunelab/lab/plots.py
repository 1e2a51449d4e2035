"""Figures comparing runs, as PNG files: curves (`lab.curves`), learning vs forgetting, metrics vs trainable
parameters.

Each variant keeps one colour in every figure, so a reader can follow it from plot to plot. A variant with seeds is
one point at its mean over seeds with 95 % t error bars (`lab.seeds`); value axes keep a minimum span and reach 0
where 0 means "no change" (`figure.steady_limits`), so noise between runs is not drawn as a gap.

**Pareto front.** Fine-tuning trades learning (higher is better) against forgetting (lower is better). A variant
is on the front when no other learns at least as much *and* forgets at most as much, with one of the two
strictly better. Variants off the front are beaten on both counts by one on it. With seeds, the front is drawn
through the means.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .curves import plot_curves
from .figure import colors_for, new_figure, place_labels, plain_y, point_label, save, steady_limits
from .results import RunInfo
from .seeds import group_runs, group_stat, half_width

LOSS_MIN_REL_SPAN = 0.1  # a loss axis spans at least 10 % of the loss: 2.51 vs 2.53 is not a cliff


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the (learning, forgetting) points not dominated by any other — maximise learning, minimise
    forgetting — ordered by forgetting, then learning. Points with a missing or non-finite value are ignored;
    identical points are all kept (neither dominates the other)."""
    valid = [(i, float(l), float(f)) for i, (l, f) in enumerate(points)
             if l is not None and f is not None and math.isfinite(l) and math.isfinite(f)]
    front = [i for i, l, f in valid
             if not any(l2 >= l and f2 <= f and (l2 > l or f2 < f) for j, l2, f2 in valid if j != i)]
    return sorted(front, key=lambda i: (points[i][1], points[i][0]))


def _learning(r: RunInfo):
    return r.scores["learning"]


def _forgetting(r: RunInfo):
    return r.scores["forgetting"]


def variant_points(runs: list[RunInfo]) -> list[tuple[str, tuple | None, tuple | None]]:
    """(variant, learning stat, forgetting stat) per variant (`lab.seeds.Stat`: mean, low, high)."""
    return [(g.name, group_stat(g, _learning), group_stat(g, _forgetting)) for g in group_runs(runs)]


def plot_learning_forgetting(runs: list[RunInfo], path: Path) -> Path | None:
    """`learning_forgetting_figure` as a PNG at `path` (None without data)."""
    fig = learning_forgetting_figure(runs)
    return save(fig, path) if fig is not None else None


def learning_forgetting_figure(runs: list[RunInfo]):
    """Scatter of forgetting (x, lower is better) vs learning (y, higher is better) with the Pareto front
    drawn through the non-dominated variants. None when no run has both numbers (no source tasks evaluated)."""
    from matplotlib.ticker import MaxNLocator

    points = variant_points(runs)
    pts = [(l[0] if l else None, f[0] if f else None) for _, l, f in points]
    have = [i for i, (l, f) in enumerate(pts) if l is not None and f is not None]
    if not have:
        return None
    front = pareto_front(pts)
    fig, (ax,) = new_figure(width=7.0, height=5.0)
    colors = colors_for([name for name, _, _ in points])
    if len(front) > 1:
        ax.plot([pts[i][1] for i in front], [pts[i][0] for i in front], "--", color="0.35", lw=1.2, zorder=1,
                label="Pareto front")
    xs, ys = [], []
    for i in have:
        name, ls, fs = points[i]
        l, f = pts[i]
        on = i in front and len(have) > 1
        xerr, yerr = half_width(fs), half_width(ls)
        if xerr is not None or yerr is not None:
            ax.errorbar([f], [l], xerr=xerr, yerr=yerr, fmt="none", ecolor=colors[name], capsize=3, zorder=2)
        ax.scatter([f], [l], s=90 if on else 50, color=colors[name], edgecolors="black" if on else "none",
                   linewidths=1.5, zorder=3)
        point_label(ax, name, f, l, colors[name])
        xs += [f - (xerr or 0), f + (xerr or 0)]
        ys += [l - (yerr or 0), l + (yerr or 0)]
    steady_limits(ax, xs, "x", include_zero=True, pad=0.18)  # 0 = "nothing forgotten", "nothing learned"
    steady_limits(ax, ys, "y", include_zero=True, pad=0.18)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.axvline(0, color="0.7", lw=0.8)
    ax.set_xlabel("forgetting (source tasks got worse) → lower is better")
    ax.set_ylabel("learning (target tasks improved) → higher is better")
    seeded = any(g.seeded for g in group_runs(runs))
    ax.set_title("learning vs forgetting — better is up and left (ringed: Pareto front)"
                 + ("\nmean over seeds, bars: 95 % t interval" if seeded else ""), fontsize=11)
    ax.xaxis.set_major_locator(MaxNLocator(6))  # tiny forgetting values have long tick labels: fewer ticks
    ax.grid(alpha=0.3)
    if len(front) > 1:
        ax.legend(loc="lower right", fontsize=8)
    place_labels(ax)
    return fig


def _params(r: RunInfo):
    return (r.results or {}).get("trainable_params")


def _eval_loss_after(r: RunInfo):
    return (r.results or {}).get("eval_loss_after")


def plot_vs_params(runs: list[RunInfo], path: Path) -> Path | None:
    """`params_figure` as a PNG at `path` (None without parameter counts)."""
    fig = params_figure(runs)
    return save(fig, path) if fig is not None else None


def params_figure(runs: list[RunInfo]):
    """Learning, forgetting and final eval loss vs trainable parameters (log x); variants of one method are
    joined, so e.g. LoRA r=8/64/256 read as a line next to full finetuning. None without parameter counts."""
    groups = group_runs(runs)
    metrics = [("learning ↑", _learning, True), ("forgetting ↓", _forgetting, True),
               ("eval loss after ↓", _eval_loss_after, False)]
    stats = {title: [(g, group_stat(g, _params), group_stat(g, get)) for g in groups]
             for title, get, _ in metrics}
    metrics = [m for m in metrics if any(p and p[0] and s for _, p, s in stats[m[0]])]
    if not metrics:
        return None
    fig, axes = new_figure(1, len(metrics), width=4.6, height=4.0)
    colors = colors_for([g.name for g in groups])
    for ax, (title, _, from_zero) in zip(axes, metrics):
        by_method: dict[str, list] = {}
        ys = []
        for g, p, s in stats[title]:
            if not (p and p[0] and s):
                continue
            x, y, err = p[0], s[0], half_width(s)
            method = (g.runs[0].results or {}).get("method") or "?"
            by_method.setdefault(method, []).append((x, y))
            if err is not None:
                ax.errorbar([x], [y], yerr=err, fmt="none", ecolor=colors[g.name], capsize=3, zorder=2)
            ax.scatter([x], [y], color=colors[g.name], s=50, zorder=3)
            point_label(ax, g.name, x, y, colors[g.name])
            ys += [y - (err or 0), y + (err or 0)]
        for method, pts in by_method.items():
            if len(pts) > 1:
                line_x, line_y = zip(*sorted(pts))
                ax.plot(line_x, line_y, color="0.6", lw=1, zorder=1)
        ax.set_xscale("log")
        ax.margins(x=0.4)  # room for the run labels written right of each point
        # learning and forgetting reach 0 ("no change"); a loss keeps a span of 10 % of its value
        steady_limits(ax, ys, include_zero=from_zero, min_rel=LOSS_MIN_REL_SPAN, pad=0.12)
        plain_y(ax)
        ax.set_xlabel("trainable parameters")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        place_labels(ax)
    return fig


def plot_all(runs: list[RunInfo], out_dir: Path) -> dict[str, Path]:
    """Every figure that has data, as ``{name: png path}`` (names: curves, learning_forgetting, params)."""
    out = {}
    for name, fn in (("curves", plot_curves), ("learning_forgetting", plot_learning_forgetting),
                     ("params", plot_vs_params)):
        p = fn(runs, Path(out_dir) / f"{name}.png")
        if p is not None:
            out[name] = p
    return out

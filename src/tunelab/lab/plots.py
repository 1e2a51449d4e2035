"""Figures comparing runs, as PNG files: loss curves, learning vs forgetting, metrics vs trainable parameters.

Figures are drawn on `matplotlib.figure.Figure` objects directly rather than through `pyplot`: no global
state, no GUI backend to select, so plotting from a library call never disturbs the caller's matplotlib.
Each run keeps one colour in every figure, so a reader can follow a variant from plot to plot.

**Pareto front.** Fine-tuning trades learning (higher is better) against forgetting (lower is better). A run
is on the front when no other run learns at least as much *and* forgets at most as much, with one of the two
strictly better. Runs off the front are beaten on both counts by some run on it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .results import RunInfo

_SKIP_EVAL_KEYS = {"step", "epoch", "tokens", "seconds", "eval_seconds"}
MAX_EXTRA_PANELS = 4
_REDUNDANT_SUFFIXES = ("/perplexity", "/answer_found")  # exp(loss), and a diagnostic: not worth a panel


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the (learning, forgetting) points not dominated by any other — maximise learning, minimise
    forgetting — ordered by forgetting, then learning. Points with a missing or non-finite value are ignored;
    identical points are all kept (neither dominates the other)."""
    valid = [(i, float(l), float(f)) for i, (l, f) in enumerate(points)
             if l is not None and f is not None and math.isfinite(l) and math.isfinite(f)]
    front = [i for i, l, f in valid
             if not any(l2 >= l and f2 <= f and (l2 > l or f2 < f) for j, l2, f2 in valid if j != i)]
    return sorted(front, key=lambda i: (points[i][1], points[i][0]))


def run_colors(runs: list[RunInfo]) -> dict[str, tuple]:
    """A stable colour per run label (tab10, or tab20 beyond ten runs)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {r.label: cmap(i % cmap.N) for i, r in enumerate(runs)}


def _figure(nrows: int = 1, ncols: int = 1, width: float = 6.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _label(ax, text: str, x: float, y: float) -> None:
    # Kept out of the layout computation: a long label near an edge must not shrink the axes to a sliver.
    ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ann.set_in_layout(False)


def _plain_y(ax) -> None:
    """No "+1.081e1" offset above the axis: losses that differ in the 3rd decimal read better in full."""
    from matplotlib.ticker import ScalarFormatter

    fmt = ScalarFormatter(useOffset=False)
    ax.yaxis.set_major_formatter(fmt)


def plot_curves(runs: list[RunInfo], path: Path) -> Path | None:
    """Train loss and eval loss vs step (one line per run), plus one panel per other numeric metric found in
    eval rows (e.g. a task's exact match measured during training). None when no run logged anything."""
    from matplotlib.ticker import MaxNLocator

    extra: list[str] = []
    for r in runs:
        for row in r.eval_rows:
            for k, v in row.items():
                if (k not in _SKIP_EVAL_KEYS and k != "eval_loss" and not k.endswith(_REDUNDANT_SUFFIXES)
                        and isinstance(v, (int, float)) and k not in extra):
                    extra.append(k)
    panels = [("loss", "train loss", lambda r: r.train_rows), ("eval_loss", "eval loss", lambda r: r.eval_rows)]
    panels += [(k, k, lambda r: r.eval_rows) for k in extra[:MAX_EXTRA_PANELS]]
    if not any(rows(r) for r in runs for _, _, rows in panels):
        return None
    ncols = min(len(panels), 2)
    fig, axes = _figure((len(panels) + ncols - 1) // ncols, ncols)
    colors = run_colors(runs)
    for ax, (key, title, rows) in zip(axes, panels):
        for r in runs:
            pts = [(row["step"], row[key]) for row in rows(r) if isinstance(row.get(key), (int, float))]
            before = (r.results or {}).get("eval_loss_before")
            if key == "eval_loss" and isinstance(before, (int, float)) and pts and pts[0][0] > 0:
                pts.insert(0, (0, before))  # the curve starts at the base model's held-out loss
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=colors[r.label], label=r.label, lw=1.4,
                        marker="o" if key != "loss" or len(pts) < 20 else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _plain_y(ax)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(len(labels), 1)), fontsize=8,
               frameon=False)
    return _save(fig, path)


def plot_learning_forgetting(runs: list[RunInfo], path: Path) -> Path | None:
    """Scatter of forgetting (x, lower is better) vs learning (y, higher is better) with the Pareto front
    drawn through the non-dominated runs. None when no run has both numbers (no source tasks evaluated)."""
    from matplotlib.ticker import MaxNLocator

    pts = [(r.scores["learning"], r.scores["forgetting"]) for r in runs]
    have = [i for i, (l, f) in enumerate(pts) if l is not None and f is not None]
    if not have:
        return None
    front = pareto_front(pts)
    fig, (ax,) = _figure(width=7.0, height=5.0)
    colors = run_colors(runs)
    if len(front) > 1:
        ax.plot([pts[i][1] for i in front], [pts[i][0] for i in front], "--", color="0.35", lw=1.2, zorder=1,
                label="Pareto front")
    for i in have:
        l, f = pts[i]
        on = i in front
        ax.scatter([f], [l], s=90 if on else 50, color=colors[runs[i].label], edgecolors="black" if on else "none",
                   linewidths=1.5, zorder=3)
        _label(ax, runs[i].label, f, l)
    ax.margins(0.18)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.axvline(0, color="0.7", lw=0.8)
    ax.set_xlabel("forgetting (source tasks got worse) → lower is better")
    ax.set_ylabel("learning (target tasks improved) → higher is better")
    ax.set_title("learning vs forgetting — better is up and left (ringed: Pareto front)", fontsize=11)
    ax.xaxis.set_major_locator(MaxNLocator(6))  # tiny forgetting values have long tick labels: fewer ticks
    ax.grid(alpha=0.3)
    if len(front) > 1:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_vs_params(runs: list[RunInfo], path: Path) -> Path | None:
    """Learning, forgetting and final eval loss vs trainable parameters (log x); runs of one method are
    joined, so e.g. LoRA r=8/64/256 read as a line next to full finetuning. None without parameter counts."""
    def params(r):
        return (r.results or {}).get("trainable_params")

    metrics = [("learning", "learning ↑", lambda r: r.scores["learning"]),
               ("forgetting", "forgetting ↓", lambda r: r.scores["forgetting"]),
               ("eval_loss_after", "eval loss after ↓", lambda r: (r.results or {}).get("eval_loss_after"))]
    metrics = [m for m in metrics if any(params(r) and m[2](r) is not None for r in runs)]
    if not metrics:
        return None
    fig, axes = _figure(1, len(metrics), width=4.6, height=4.0)
    colors = run_colors(runs)
    for ax, (_, title, get) in zip(axes, metrics):
        by_method: dict[str, list] = {}
        for r in runs:
            x, y = params(r), get(r)
            if x and y is not None:
                method = (r.results or {}).get("method") or "?"
                by_method.setdefault(method, []).append((x, y))
                ax.scatter([x], [y], color=colors[r.label], s=50, zorder=3)
                _label(ax, r.label, x, y)
        for method, pts in by_method.items():
            if len(pts) > 1:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, color="0.6", lw=1, zorder=1)
        ax.set_xscale("log")
        ax.margins(x=0.4, y=0.12)  # room for the run labels written right of each point
        _plain_y(ax)
        ax.set_xlabel("trainable parameters")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_all(runs: list[RunInfo], out_dir: Path) -> dict[str, Path]:
    """Every figure that has data, as ``{name: png path}`` (names: curves, learning_forgetting, params)."""
    out = {}
    for name, fn in (("curves", plot_curves), ("learning_forgetting", plot_learning_forgetting),
                     ("params", plot_vs_params)):
        p = fn(runs, Path(out_dir) / f"{name}.png")
        if p is not None:
            out[name] = p
    return out

"""What every report figure shares: the figure itself, colours, integer step axes and value axes that do not zoom
into noise.

Figures are drawn on `matplotlib.figure.Figure` objects directly rather than through `pyplot`: no global state, no
GUI backend to select, so plotting from a library call never disturbs the caller's matplotlib.

**Step axes** (`integer_steps`) tick at whole optimizer steps only, and a series that spans fewer than two steps
(one logged point) gets a window of ±1 step around it: matplotlib's default window around one point is ±0.1, whose
ticks are fractional steps that never happened.

**Value axes** (`steady_limits`) span at least a floor: with ``include_zero`` the axis reaches 0 (scores whose zero
means "no change", such as learning and forgetting), and in any case at least ``min_rel`` × the largest |value|. So
two runs at 0.0227 and 0.0234 read as the 3 % apart they are, not as one at the bottom and one at the top of the
axis — autoscaling alone stretches any spread, however small, to the full height.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 6.0, height: float = 4.2):
    """(figure, flat list of its axes), laid out by matplotlib's constrained layout."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def colors_for(names: list[str]) -> dict[str, tuple]:
    """A stable colour per name (tab10, or tab20 beyond ten), so a variant keeps its colour in every figure."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def short_name(name: str) -> str:
    """A grid variant's name as its coordinates only: "short-response,data.limit=16,data.masking=none" →
    "short-response · 16 · none" (the keys are the study's, the same for every point); other names unchanged."""
    parts = name.split(",")
    if len(parts) < 2 or not any("=" in p for p in parts):
        return name
    return " · ".join(p.split("=", 1)[-1] for p in parts)


def point_label(ax, text: str, x: float, y: float, color=None) -> None:
    """A run's name for its point (grid coordinates shortened; in the point's colour, so a label moved off its
    point still says whose it is); written by `place_labels` once the axes' limits are final, so that labels can
    keep clear of each other and of the right edge."""
    ax.__dict__.setdefault("_tunelab_labels", []).append((short_name(text), x, y, color))


def place_labels(ax) -> None:
    """Write the labels `point_label` collected: right of the point, or left of it where the text would run past
    the axes' right edge; a label that would overlap one already written moves down a line until it is clear.
    Kept out of the layout computation: a long label near an edge must not shrink the axes to a sliver."""
    scale = ax.figure.dpi / 72  # display pixels per point
    placed: list[tuple[float, float, float]] = []  # (left, right, baseline) of each written label, in pixels
    for text, x, y, color in ax.__dict__.pop("_tunelab_labels", []):
        px, py = ax.transData.transform((x, y))
        width = len(text) * 4.2 * scale  # fontsize 7: ~4.2 points per character
        flip = px + (5 * scale) + width > ax.bbox.x1
        left = px - 5 * scale - width if flip else px + 5 * scale
        dy = 4
        while any(left < r and left + width > lo and abs(py + dy * scale - base) < 9 * scale
                  for lo, r, base in placed):
            dy -= 9
        placed.append((left, left + width, py + dy * scale))
        if color is not None:  # the point's hue, darkened: tab20's pale shades are unreadable as text
            from matplotlib.colors import to_rgb

            color = tuple(0.6 * c for c in to_rgb(color))
        ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(-5 if flip else 5, dy), fontsize=7,
                          ha="right" if flip else "left", color=color)
        ann.set_in_layout(False)


def plain_y(ax) -> None:
    """No "+1.081e1" offset above the axis: losses that differ in the 3rd decimal read better in full."""
    from matplotlib.ticker import ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))


def integer_steps(ax, steps: Iterable[float] = ()) -> None:
    """Ticks at whole steps only; a window of at least ±1 step around data that spans less than two steps."""
    from matplotlib.ticker import MaxNLocator

    xs = [float(s) for s in steps if math.isfinite(float(s))]
    if xs and max(xs) - min(xs) < 2:
        ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def steady_limits(ax, values: Iterable[float], axis: str = "y", include_zero: bool = False, min_rel: float = 0.1,
                  pad: float = 0.08) -> tuple[float, float] | None:
    """Set `axis`'s limits to cover `values` (and 0 with `include_zero`) over a span of at least `min_rel` × the
    largest |value|, plus `pad` × the span on each side. Returns the limits set (None when no finite value)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    if include_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    need = min_rel * max(abs(lo), abs(hi))
    if hi - lo < need:
        mid = (lo + hi) / 2
        lo, hi = mid - need / 2, mid + need / 2
        if include_zero:  # widened around the middle, the span may have left 0 behind
            lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:  # every value 0: nothing to scale by
        lo, hi = lo - 1, hi + 1
    margin = pad * (hi - lo)
    limits = (lo - margin, hi + margin)
    if not all(math.isfinite(x) for x in limits):  # values near the float range: matplotlib's own autoscaling
        return None
    (ax.set_ylim if axis == "y" else ax.set_xlim)(*limits)
    return limits

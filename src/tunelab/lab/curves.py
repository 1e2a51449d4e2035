"""The curves figure: every numeric series a run logged to ``metrics.jsonl``, against optimizer steps.

Each objective logs its own measures (`train.loop` writes the step's loss, lr and grad norm plus the objective's
metrics; evaluation rows add the held-out ones). The figure plots all of them, one panel per *kind* of series
(`panel_of`), a panel only when some run logged a series of its kind:

=============  ===============================================================================================
panel          series (``eval_<name>``: the held-out counterpart, drawn in the same panel)
=============  ===============================================================================================
loss           ``loss`` (training) and ``eval_loss`` (held-out, starting at the base model's, step 0)
reward         ``reward``, ``reward_<component>``, ``reward_std``, ``score``, DPO's ``reward_chosen`` /
               ``reward_rejected`` / ``reward_margin``
accuracy       ``pref_accuracy``, ``eval_pairwise_accuracy``, …
KL             ``kl``, ``kl_ref``, ``kl_seq``, ``approx_kl``, ``kl_coef``, ``mismatch_kl``, ``non_score_reward``
entropy        ``entropy``, ``entropy_sampled``
learning rate  ``lr``
gradient norm  ``grad_norm``
rates          ``clip_fraction``, ``truncated`` (truncation rate), ``zero_signal_groups`` (zero-spread fraction),
               ``kept_fraction``, ``early_stopped``, …
loss terms     ``policy_loss``, ``value_loss``, ``nll``, ``log_odds_ratio``
log-probs      ``logp_chosen``, ``logp_rejected``
length         ``completion_length``, ``completion_len``
values         ``adv_*``, ``advantage_abs``, ``value_*``, ``return_mean``, ``explained_variance``
other          anything else numeric
task metrics   ``<task>/<metric>`` (``eval.during_training``): one panel per metric, one series per task
=============  ===============================================================================================

Bookkeeping is not plotted: step, epoch, round, token and loss-unit counts, seconds, throughput (`_SKIP`), and
``<task>/perplexity`` (exp of a loss already shown) and ``<task>/answer_found`` (a diagnostic).

In a panel, colour is the run (the variant: the mean over its seeds with a shaded 95 % band, `lab.seeds`), line style
and marker are the series (listed in the panel's legend when it holds more than one). A series of one logged point
is a marker, not a line. Step axes tick at whole steps (`figure.integer_steps`); value axes keep a minimum span
(`figure.steady_limits`) so a flat curve does not fill the panel with its noise.
"""

from __future__ import annotations

import math
from pathlib import Path

from .figure import colors_for, integer_steps, new_figure, plain_y, save, steady_limits
from .results import RunInfo
from .seeds import Group, group_runs, mean_curve

_SKIP = {"step", "epoch", "round", "tokens", "n_loss_units", "kept", "kept_of", "n_pairs", "n_desirable",
         "seconds", "weight_sync_seconds", "mismatch_max_abs_logp"}
_SKIP_SUFFIXES = ("_seconds", "tokens_per_s", "/perplexity", "/answer_found")
PANELS = {"loss": "loss", "reward": "reward / score", "accuracy": "accuracy",
          "kl": "KL divergence", "entropy": "entropy", "lr": "learning rate", "grad_norm": "gradient norm",
          "rates": "rates (fraction)", "loss_terms": "loss terms", "logp": "log-probabilities",
          "length": "completion length (tokens)", "values": "advantages and values", "other": "other"}
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # series i: style i mod 4, marker i mod 8 — told apart as points
MIN_REL_SPAN = 0.05  # a curve's value axis spans at least 5 % of its largest |value|


def panel_of(key: str) -> str | None:
    """The panel a metrics.jsonl key is drawn in (module docstring); None for bookkeeping."""
    if key in _SKIP or key.endswith(_SKIP_SUFFIXES):
        return None
    if "/" in key:
        return "task:" + key.rsplit("/", 1)[1]
    base = key[len("eval_"):] if key.startswith("eval_") else key
    words = base.split("_")
    if base == "loss":
        return "loss"
    if base in ("lr", "grad_norm"):
        return base
    if "kl" in words or base == "non_score_reward":
        return "kl"
    if "entropy" in base:
        return "entropy"
    if "accuracy" in base:
        return "accuracy"
    if base.endswith("fraction") or base in ("truncated", "zero_signal_groups", "early_stopped", "value_warmup"):
        return "rates"
    if "reward" in base or base in ("score", "margin"):
        return "reward"
    if base.endswith("loss") or base in ("nll", "log_odds_ratio"):
        return "loss_terms"
    if "logp" in words:
        return "logp"
    if "length" in base or base.endswith("_len"):
        return "length"
    if words[0] in ("adv", "advantage", "value", "return") or base == "explained_variance":
        return "values"
    return "other"


def panel_title(panel: str, keys: list[str]) -> str:
    """The panel's kind; with one series, its key too (unless the kind already names it)."""
    if panel.startswith("task:"):
        return f"{panel[len('task:'):]} (tasks, during training)"
    title = PANELS[panel]
    if len(keys) == 1 and keys[0] not in ("loss", "lr", "grad_norm", "entropy"):
        return keys[0] if panel == "other" else f"{title}: {keys[0]}"
    return title


def _numeric(v) -> bool:
    """A value that can be drawn: a number, not NaN (not measured), not ±inf or beyond ±1e100 (a diverged step:
    matplotlib's tick computation overflows on it)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e100


def panels_for(runs: list[RunInfo]) -> dict[str, list[str]]:
    """{panel: [series keys]} for every panel some run has data for, in `PANELS` order, then task metrics."""
    found: dict[str, list[str]] = {}
    for r in runs:
        for row in r.metrics:
            if not _numeric(row.get("step")):
                continue
            for k, v in row.items():
                panel = panel_of(k)
                if panel and _numeric(v) and k not in found.setdefault(panel, []):
                    found[panel].append(k)
    order = [p for p in PANELS if found.get(p)] + sorted(p for p in found if p.startswith("task:") and found[p])
    out = {p: found[p] for p in order}
    if "loss" in out:
        out["loss"].sort(key=lambda k: k != "loss")  # training first: solid
    return out


def series_points(run: RunInfo, key: str) -> list[tuple[float, float]]:
    """(step, value) of one series in one run; the held-out loss starts at the base model's (step 0)."""
    pts = [(row["step"], row[key]) for row in run.metrics if _numeric(row.get(key)) and _numeric(row.get("step"))]
    before = (run.results or {}).get("eval_loss_before")
    if key == "eval_loss" and _numeric(before) and pts and pts[0][0] > 0:
        pts.insert(0, (0, before))
    return pts


_SCORE_WORDS = ("accuracy", "match", "recall", "pass", "rate", "fraction", "acc")


def value_bounds(key: str, raw: list[float]) -> tuple[float, float]:
    """Where a mean's interval may lie: a t-interval over 3 seeds can reach past what the quantity can be (an
    accuracy above 1, a loss or a gradient norm below 0). Never negative when no seed ever was; at most 1 for a
    score that never left [0, 1]."""
    low = 0.0 if raw and min(raw) >= 0 else -math.inf
    score = any(w in key.lower() for w in _SCORE_WORDS)
    high = 1.0 if score and raw and low == 0.0 and max(raw) <= 1 else math.inf
    return low, high


def _draw(ax, group: Group, key: str, color, style: str, marker, steps: list, values: list) -> bool:
    """Draw one group's mean curve (and band) of one series; False when the group has no point of it."""
    curve = mean_curve(group, lambda r: series_points(r, key))
    if not curve:
        return False
    lo_cap, hi_cap = value_bounds(key, [v for r in group.runs for _, v in series_points(r, key)])
    xs = [s for s, _ in curve]
    means = [m for _, (m, _, _) in curve]
    lows = [max(lo, lo_cap) if lo is not None else m for _, (m, lo, _) in curve]
    highs = [min(hi, hi_cap) if hi is not None else m for _, (m, _, hi) in curve]
    steps += xs
    values += lows + highs
    banded = any(lo is not None for _, (_, lo, _) in curve)
    if len(curve) == 1:  # one point: a marker (with its interval), no line to nowhere
        err = [[means[0] - lows[0]], [highs[0] - means[0]]] if banded else None
        ax.errorbar(xs, means, yerr=err, fmt=marker, color=color, ms=5, capsize=3)
        return True
    ax.plot(xs, means, color=color, lw=1.4, linestyle=style, marker=marker if len(xs) < 20 else None, ms=3)
    if banded:
        ax.fill_between(xs, lows, highs, color=color, alpha=0.2, lw=0)
    return True


def plot_curves(runs: list[RunInfo], path: Path) -> Path | None:
    """`curves_figure` as a PNG at `path`; None when no run logged anything."""
    fig = curves_figure(runs)
    return save(fig, path) if fig is not None else None


def curves_figure(runs: list[RunInfo]):
    """One panel per kind of logged series (module docstring), as a matplotlib Figure; None when no run logged
    anything."""
    from matplotlib.lines import Line2D

    panels = panels_for(runs)
    if not panels:
        return None
    groups = group_runs(runs)
    ncols = 1 if len(panels) == 1 else 2 if len(panels) <= 4 else 3
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = new_figure(nrows, ncols, width=6.0 if ncols < 3 else 4.8, height=3.8)
    colors = colors_for([g.name for g in groups])
    drawn: set[str] = set()  # the legend names only variants with a curve (not one whose runs are still to come)
    for ax, (panel, keys) in zip(axes, panels.items()):
        steps: list = []
        values: list = []
        for i, key in enumerate(keys):
            style, marker = _STYLES[i % len(_STYLES)], _MARKERS[i % len(_MARKERS)]
            for g in groups:
                if _draw(ax, g, key, colors[g.name], style, marker, steps, values):
                    drawn.add(g.name)
        if len(keys) > 1:  # which line style is which series
            ax.legend([Line2D([], [], color="0.3", linestyle=_STYLES[i % len(_STYLES)],
                              marker=_MARKERS[i % len(_MARKERS)], ms=4) for i in range(len(keys))],
                      keys, fontsize=7, loc="best", frameon=False)
        ax.set_title(panel_title(panel, keys), fontsize=10)
        ax.set_xlabel("step")
        integer_steps(ax, steps)
        steady_limits(ax, values, min_rel=MIN_REL_SPAN)
        if panel != "lr":
            plain_y(ax)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    shown = [g for g in groups if g.name in drawn]
    seeded = any(g.seeded for g in shown)
    handles = [Line2D([], [], color=colors[g.name], lw=2) for g in shown]
    counts = {g.name: sum(1 for r in g.runs if r.metrics) for g in shown}
    title = None
    if seeded and all(g.seeded for g in shown) and len(set(counts.values())) == 1:  # said once, above the names
        labels, title = [g.name for g in shown], f"mean of {next(iter(counts.values()))} seeds, 95 % band"
    else:
        labels = [g.name + (f" (mean of {counts[g.name]} seeds, 95 % band)" if seeded and g.seeded else "")
                  for g in shown]
    fig.legend(handles, labels, loc="outside lower center", ncols=legend_columns(labels, fig.get_figwidth()),
               fontsize=8, title=title, title_fontsize=8, frameon=False)
    return fig


def legend_columns(labels: list[str], fig_width_in: float, fontsize: float = 8) -> int:
    """As many legend columns (≤ 4) as fit across the figure: an entry is its handle and gaps (~0.8 in) plus its
    text at ~0.55 em per character — a legend wider than the figure is cut at both edges when saved."""
    if not labels:
        return 1
    entry = 0.8 + 0.55 * fontsize / 72 * max(len(t) for t in labels)
    return max(1, min(4, len(labels), int(fig_width_in // entry)))

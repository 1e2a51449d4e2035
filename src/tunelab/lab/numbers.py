"""How the report writes a number: one rule per kind of quantity, used by every table, label and summary line.

==========  =======================================================  ================================
kind        rule                                                     example
==========  =======================================================  ================================
loss        3 decimals (losses are compared in the 2nd–3rd decimal)  ``2.513``
pct         a fraction in [0, 1] shown as a percentage, 1 decimal    ``0.4375`` → ``43.8 %``
percent     a value already in percent, 1 decimal                    ``1.2 %``
reward      3 significant digits (rewards, KL, entropy, …)           ``0.0227``, ``1.26``
float       3 significant digits (anything else measured)            ``0.000123``
signed      3 significant digits with a sign (learning, forgetting)  ``+0.0234``, ``-0.105``
int         thousands separators                                     ``12,800``
params      parameter counts in k / M / B, 3 significant digits      ``1.2M``
seconds     1 decimal                                                ``12.3``
text        as is
==========  =======================================================  ================================

Missing values (None, NaN) are an em dash. A mean over seeds with its 95 % interval reads ``mean ± half-width``
(`fmt_ci`), the half-width written to the same last decimal as the mean, so the two line up in a column. The kind of a
logged metric comes from its name (`kind_of`): ``*loss*`` and ``nll`` are losses, ``*accuracy*``, ``exact_match``,
``pass@k``, ``*fraction``, ``truncated`` and ``zero_signal_groups`` are fractions shown as percentages, the rest
(rewards, KL, entropy, norms) are 3 significant digits. CSV files keep full precision: formatting is for reading.
"""

from __future__ import annotations

import math

_FRACTION_NAMES = ("accuracy", "exact_match", "pass@", "fraction", "truncated", "zero_signal_groups", "acc_norm",
                   "acc", "answer_found", "early_stopped")
_LOSS_NAMES = ("loss", "nll")


def kind_of(key: str) -> str:
    """The formatting kind of a metric named `key` (a metrics.jsonl key, a task metric or a table column)."""
    name = key.rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
    if name.startswith("eval_"):
        name = name[len("eval_"):]
    if any(n in name for n in _LOSS_NAMES):
        return "loss"
    if any(name == n or name.startswith(n) or name.endswith(n) for n in _FRACTION_NAMES):
        return "pct"
    return "reward"


def decimals(value: float, kind: str) -> int:
    """The number of decimals `fmt` writes for `value` of a numeric `kind` (0 for kinds written without)."""
    if kind == "loss":
        return 3
    if kind in ("pct", "percent", "seconds"):
        return 1
    if kind in ("reward", "float", "signed"):
        v = abs(float(value))
        if v == 0 or not math.isfinite(v):
            return 2
        return max(0, 2 - math.floor(math.log10(v)))  # 3 significant digits
    return 0


def _fixed(value: float, places: int, signed: bool = False) -> str:
    return f"{value:+.{places}f}" if signed else f"{value:.{places}f}"


def fmt(value, kind: str = "float") -> str:
    """`value` as text by the rule of its `kind` (module docstring); missing is an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "text" or isinstance(value, str):
        return str(value)
    if isinstance(value, bool):
        return str(value).lower()
    v = float(value)
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if kind == "params":
        for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if v >= size:
                return f"{v / size:.3g}{unit}"
        return f"{int(v)}"
    if kind == "int":
        return f"{int(round(v)):,}"
    if kind == "pct":
        return f"{100 * v:.1f} %"
    if kind == "percent":
        return f"{v:.1f} %"
    if kind in ("reward", "float", "signed") and v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-4):
        return f"{v:+.2e}" if kind == "signed" else f"{v:.2e}"  # far from 1: an exponent, not a row of zeros
    if kind == "seconds":
        return f"{v:,.1f}"
    return _fixed(v, decimals(v, kind), signed=kind == "signed")


def fmt_ci(mean, low=None, high=None, kind: str = "float") -> str:
    """``mean ± half-width`` of a 95 % interval (`lab.stats.mean_ci`); only the mean when there is no interval
    (one seed). The half-width is written to the mean's last decimal (percentages: in percentage points)."""
    text = fmt(mean, kind)
    if mean is None or low is None or high is None or kind in ("text", "params"):
        return text
    half = (float(high) - float(low)) / 2
    if kind == "pct":
        return f"{100 * float(mean):.1f} ± {100 * half:.1f} %"
    if kind == "percent":
        return f"{float(mean):.1f} ± {half:.1f} %"
    if "e" in text:  # exponent notation: the half-width in the same notation
        return f"{text} ± {half:.2e}"
    places = decimals(mean, kind) if kind != "int" else 0
    return f"{text} ± {half:.{places}f}"

"""The statistics behind a study's verdicts: computed from per-item scores, never written by hand.

Input: for two variants A and B, the score of every evaluation item i after training with seed s, paired on
(seed, item) — the same items, the same seeds (``eval/<task>.items.jsonl``, `lab.claims`). Everything is
oriented so that a positive difference means *A is better* (for a lower-is-better score such as a loss,
d = B − A).

**Per variant** (`mean_ci`): the mean over seeds of each seed's item mean, with the 95 % t interval over the S seed
means, mean ± t_{.975, S−1} · sd / √S (Student 1908; none for S = 1). It answers "how much does this variant's
score move from seed to seed".

**Per claimed pair** (`compare_paired`):

* difference  d̄ = mean over items of d_i, with d_i = mean over seeds of (A − B) on item i;
* 95 % CI     paired bootstrap (Efron & Tibshirani 1993, ch. 13): B ≥ 10 000 resamples, each drawing n items with
              replacement — the same items for A and B and for every seed, so pairs stay pairs (seed s of A stays
              with seed s of B). Percentile interval; the generator is seeded, so the same inputs give the same
              interval. Items are resampled, seeds are not: the interval speaks about the item population at
              these seeds, so the verdict also asks the difference to hold in every seed (below).
* p-value     for 0/1 scores from one seed: McNemar's exact test (McNemar 1947) — under H0 the b items only A got
              right and the c items only B got right are Binomial(b + c, ½), p = min(1, 2·P(X ≤ min(b, c))).
              Otherwise the paired sign-flip permutation test (Fisher 1935; Good 2005 §3): under H0 the labels A/B
              of each item are exchangeable, so every d_i's sign is flipped at random; p = (1 + #{|mean*| ≥
              |d̄|}) / (1 + R), exact (all 2^n sign patterns) when 2^n ≤ R.
* Holm        across the claims of one study (Holm 1979): sort the m p-values, p_(j)·(m − j + 1), running
              maximum, capped at 1 — the family-wise error stays ≤ α with no independence assumption.
* verdict     ``A better`` when there are at least two seeds (`MIN_SEEDS`), the Holm-adjusted p < α, the CI lies
              above 0 and every seed's mean difference is > 0; ``B better`` symmetrically; ``inconclusive``
              otherwise. The per-seed rule is what keeps training noise honest: one lucky seed cannot carry a
              verdict that the item bootstrap alone would grant. With one seed there is nothing to check it
              against: the tests above then compare two checkpoints, not two methods, so one seed is never a
              verdict, however small its p (it still gets its Δ, CI, p and MDD).
* margin      optional, declared by a claim *before* its runs (``margin: 0.02``, in the score's units): the
              smallest difference that matters. It separates "real" from "matters" (a verdict on a difference of
              0.003 nats is still a verdict): ``A better`` then also needs the CI's lower end above +margin (``B
              better``: the upper end below −margin), and a new verdict, ``negligible``, says the difference is
              smaller than the margin — two one-sided tests (TOST, Schuirmann 1987) through their duality with the
              interval: the (1 − 2α/m) bootstrap interval lies inside (−margin, +margin), m the number of the
              study's claims (Bonferroni, so the family-wise error stays ≤ α as with Holm), at ≥ `MIN_SEEDS`
              seeds, every seed's Δ inside too. A margin chosen after seeing the data is not a margin.
* MDD         the minimum detectable difference at this n: (z_{1−α/2} + z_{power}) · SE = 2.80 · SE for α = .05
              and power .8 (Cohen 1988), SE the bootstrap standard error of d̄. An inconclusive |d̄| well below the
              MDD says "this study is too small to see a difference this size", not "there is none". The normal
              approximation fails at a handful of items: when even the most extreme data could not give p < α
              (the exact test's smallest p — 2 / 2^n for the sign flip over n items, 2 / 2^(b+c) for McNemar —
              is ≥ α), no difference is detectable and the MDD is infinite.

Only numpy is needed (scipy is not a dependency); the t and normal quantiles are computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

ALPHA = 0.05
MIN_SEEDS = 2  # a verdict is never read off one seed (module docstring)
N_RESAMPLES = 10_000
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423]  # t_{.975, df}, df = 1 … 30 (any statistics table)


def z_quantile(p: float) -> float:
    """Φ⁻¹(p), the standard normal quantile (Acklam's rational approximation, |error| < 1.2e-9 after one
    Newton step)."""
    if not 0 < p < 1:
        raise ValueError("p must be in (0, 1)")
    a = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
         -3.066479806614716e+01, 2.506628277459239e+00)
    b = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
         -1.328068155288572e+01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
         4.374664141464968e+00, 2.938163982698783e+00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)
    q = min(p, 1 - p)
    if q < 0.02425:
        r = math.sqrt(-2 * math.log(q))
        x = (((((c[0] * r + c[1]) * r + c[2]) * r + c[3]) * r + c[4]) * r + c[5]) / \
            ((((d[0] * r + d[1]) * r + d[2]) * r + d[3]) * r + 1)
        x = x if p < 0.5 else -x
    else:
        r = p - 0.5
        s = r * r
        x = (((((a[0] * s + a[1]) * s + a[2]) * s + a[3]) * s + a[4]) * s + a[5]) * r / \
            (((((b[0] * s + b[1]) * s + b[2]) * s + b[3]) * s + b[4]) * s + 1)
    e = 0.5 * math.erfc(-x / math.sqrt(2)) - p  # one Newton step on Φ(x) = p
    return x - e * math.sqrt(2 * math.pi) * math.exp(x * x / 2)


def t975(df: int) -> float:
    """t_{.975, df}: the table for df ≤ 30, the Cornish–Fisher expansion beyond (error < 1e-4)."""
    if df < 1:
        raise ValueError("df must be ≥ 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(seed_means) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the mean of the per-seed means and its 95 % t interval (None, None for one seed)."""
    x = np.asarray(seed_means, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, None, None
    half = t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, m - half, m + half


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial test of k successes in n trials at p = ½ (symmetric: 2 · the smaller tail)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mcnemar_exact(a, b) -> tuple[float, int, int]:
    """McNemar's exact test on paired 0/1 scores: (p, items only A got right, items only B got right)."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return binom_two_sided(min(only_a, only_b), only_a + only_b), only_a, only_b


def sign_flip_test(d, n_resamples: int = N_RESAMPLES, seed: int = 0) -> float:
    """Paired permutation test of mean(d) = 0 by random sign flips (exact enumeration when 2^n ≤ n_resamples)."""
    d = np.asarray(d, dtype=float)
    d = d[d != 0]  # zero differences have no sign to flip: they cannot move the statistic
    n = len(d)
    if n == 0:
        return 1.0
    obs = abs(d.mean())
    tol = 1e-12 * max(1.0, obs)
    if 2 ** n <= n_resamples:
        signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        return float((np.abs(signs @ d / n) >= obs - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_resamples, 1000):  # in blocks: 10k × n signs at once could be large
        k = min(1000, n_resamples - start)
        signs = rng.integers(0, 2, size=(k, n)) * 2 - 1
        hits += int((np.abs(signs @ d / n) >= obs - tol).sum())
    return (1 + hits) / (1 + n_resamples)


def bootstrap_means(diff: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution of the mean of a [seeds, items] difference matrix: items drawn with replacement,
    the same draw for every seed (and for A and B, whose difference `diff` is), so every pair stays together."""
    per_item = diff.mean(axis=0)  # each item's difference averaged over the seeds
    n = len(per_item)
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, 1000):
        k = min(1000, n_resamples - start)
        out[start:start + k] = per_item[rng.integers(0, n, size=(k, n))].mean(axis=1)
    return out


@dataclass
class Paired:
    """The comparison of A and B on one task (positive = A better); see the module docstring."""

    diff: float  # mean difference, A − B oriented so > 0 is better for A
    low: float  # 95 % bootstrap CI
    high: float
    p: float  # unadjusted
    test: str  # "mcnemar" | "sign-flip"
    se: float  # bootstrap standard error of diff
    mdd: float  # minimum detectable difference (α = .05, power .8)
    n_items: int
    n_seeds: int
    per_seed: list  # the mean difference within each seed
    p_holm: float | None = None
    verdict: str | None = None
    margin: float | None = None  # the claim's declared smallest difference that matters (module docstring)
    eq_low: float | None = None  # the (1 − 2α/m) interval the ``negligible`` verdict needs inside ±margin
    eq_high: float | None = None
    boot: np.ndarray | None = field(default=None, repr=False, compare=False)  # bootstrap means of diff

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "boot"}

    def direction(self, alpha: float = ALPHA) -> int:
        """+1 / −1 when the difference is real — Holm-adjusted p < α, the 95 % CI off 0 on that side, every seed's Δ
        on it — else 0. Whether it also clears a declared margin is `verdict`'s question."""
        p = self.p_holm if self.p_holm is not None else self.p
        if p >= alpha:
            return 0
        if self.low > 0 and all(x > 0 for x in self.per_seed):
            return 1
        if self.high < 0 and all(x < 0 for x in self.per_seed):
            return -1
        return 0


def compare_paired(a, b, higher_is_better: bool = True, n_resamples: int = N_RESAMPLES, seed: int = 0,
                   alpha: float = ALPHA, power: float = 0.8, margin: float | None = None) -> Paired:
    """A vs B from score matrices [seeds, items] paired position by position (see the module docstring)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores need the same non-empty shape (got {a.shape} and {b.shape})")
    diff = a - b if higher_is_better else b - a
    S, n = diff.shape
    boot = bootstrap_means(diff, n_resamples, seed)
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    if binary and S == 1:
        p, test = mcnemar_exact(a[0], b[0])[0], "mcnemar"
    else:
        p, test = sign_flip_test(diff.mean(axis=0), n_resamples, seed), "sign-flip"
    se = float(boot.std(ddof=1))
    low, high = (float(x) for x in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    mdd = (z_quantile(1 - alpha / 2) + z_quantile(power)) * se
    if smallest_p(test, n, a, b, n_resamples) >= alpha:
        mdd = math.inf  # no data of this size could reach p < α
    if margin is not None and not margin > 0:
        raise ValueError(f"a margin is a positive difference (got {margin})")
    return Paired(float(diff.mean()), low, high, float(p), test, se, mdd, n, S,
                  [float(x) for x in diff.mean(axis=1)], margin=margin, boot=boot)


def smallest_p(test: str, n: int, a=None, b=None, n_resamples: int = N_RESAMPLES) -> float:
    """The smallest p-value the test can give at this size (see MDD in the module docstring)."""
    if test == "mcnemar":
        discordant = int((np.asarray(a) != np.asarray(b)).sum())
        return min(1.0, 2 * 0.5 ** discordant) if discordant else 1.0
    return 2 / 2 ** n if 2 ** n <= n_resamples else 1 / (1 + n_resamples)


def holm(pvalues) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order."""
    p = list(pvalues)
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def verdict(result: Paired, alpha: float = ALPHA, min_seeds: int = MIN_SEEDS) -> str:
    """``A better`` / ``B better`` / ``negligible`` / ``inconclusive`` from the seeds, the Holm-adjusted p, the CI and
    a declared margin (module docstring); ``negligible`` needs `eq_low`/`eq_high`, which `decide` sets."""
    if len(result.per_seed) < min_seeds:
        return "inconclusive"
    bar = result.margin or 0.0
    sign = result.direction(alpha)
    if sign > 0 and result.low > bar:
        return "A better"
    if sign < 0 and result.high < -bar:
        return "B better"
    m = result.margin
    if m and result.eq_low is not None and -m < result.eq_low and result.eq_high < m \
            and all(abs(x) < m for x in result.per_seed):
        return "negligible"
    return "inconclusive"


def decide(results: list[Paired], alpha: float = ALPHA, min_seeds: int = MIN_SEEDS) -> list[Paired]:
    """Holm across one study's claims, the equivalence intervals of claims with a margin, then each claim's
    verdict (in place; returns the list)."""
    m = len(results)
    for r, adj in zip(results, holm([r.p for r in results])):
        r.p_holm = adj
        if r.margin and r.boot is not None:
            r.eq_low, r.eq_high = (float(x) for x in np.quantile(r.boot, [alpha / m, 1 - alpha / m]))
        r.verdict = verdict(r, alpha, min_seeds)
    return results

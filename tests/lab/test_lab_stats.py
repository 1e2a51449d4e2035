"""lab/stats.py against hand-computed cases: the tests, Holm, intervals, and the verdict rules."""

import math

import numpy as np
import pytest

from tunelab.lab.stats import (binom_two_sided, compare_paired, decide, holm, mcnemar_exact, mean_ci,
                               sign_flip_test, t975, z_quantile)


def test_quantiles():
    assert z_quantile(0.975) == pytest.approx(1.959963985, abs=1e-8)
    assert z_quantile(0.8) == pytest.approx(0.841621234, abs=1e-8)
    assert z_quantile(0.01) == pytest.approx(-2.326347874, abs=1e-8)
    assert t975(2) == pytest.approx(4.3027, abs=1e-4)
    assert t975(60) == pytest.approx(2.0003, abs=2e-4)  # table value for df = 60
    assert t975(120) == pytest.approx(1.9799, abs=2e-4)


def test_mean_ci_is_the_t_interval_over_seed_means():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1: half-width t_{.975,2} / √3 = 4.3027 / 1.7321 = 2.4842
    assert m == 2.0 and lo == pytest.approx(2 - 2.48417, abs=1e-4) and hi == pytest.approx(2 + 2.48417, abs=1e-4)
    assert mean_ci([0.4]) == (0.4, None, None)


def test_mcnemar_matches_the_exact_binomial_by_hand():
    # 1 item only A got right, 6 only B: 2 · P(X ≤ 1 | n=7, ½) = 2 · (1 + 7) / 128 = 0.125
    # (scipy.stats.binomtest(1, 7).pvalue == 0.125; scipy is not installed here, so by hand)
    a = [1, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    p, only_a, only_b = mcnemar_exact(a, b)
    assert (only_a, only_b) == (1, 6) and p == pytest.approx(0.125)
    assert binom_two_sided(0, 5) == pytest.approx(2 / 32)  # binomtest(0, 5).pvalue = 0.0625
    assert binom_two_sided(3, 6) == 1.0 and binom_two_sided(0, 0) == 1.0


def test_sign_flip_exact_by_hand():
    # d = 1, 2, 3: of the 8 sign patterns only +++ and --- reach |mean| ≥ 2 → p = 2/8
    assert sign_flip_test([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    assert sign_flip_test([0.0, 0.0]) == 1.0
    # Monte Carlo branch (2^20 > 10k): a clear shift gives the smallest possible p, 1 / (1 + R)
    assert sign_flip_test(np.ones(20), n_resamples=2000) == pytest.approx(1 / 2001)


def test_holm_by_hand():
    # sorted: .005·4 = .02, .01·3 = .03, .03·2 = .06, .04·1 = .04 → running max .06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.6, 0.9]) == [1.0, 1.0]


def test_a_known_difference_is_found():
    rng = np.random.default_rng(1)
    b = (rng.random((3, 100)) < 0.3).astype(float)
    a = b.copy()
    a[:, :40] = 1.0  # A is right on 40 more items, in every seed
    r = decide([compare_paired(a, b)])[0]
    assert r.test == "sign-flip" and r.diff == pytest.approx(float((a - b).mean()))
    assert r.low > 0 and r.p_holm < 0.001 and r.verdict == "A better"
    assert decide([compare_paired(b, a)])[0].verdict == "B better"
    one = decide([compare_paired(a[:1], b[:1])])[0]  # one seed, 0/1 scores: McNemar, but no verdict
    assert one.test == "mcnemar" and one.p < 1e-6 and one.low > 0 and one.verdict == "inconclusive"


def test_identical_runs_are_inconclusive():
    a = (np.random.default_rng(2).random((2, 50)) < 0.5).astype(float)
    r = decide([compare_paired(a, a.copy())])[0]
    assert r.diff == 0 and r.p == 1.0 and r.verdict == "inconclusive" and (r.low, r.high) == (0.0, 0.0)


def test_lower_is_better_orientation_and_mdd():
    loss_a = np.full((2, 30), 1.0) + np.linspace(0, 0.1, 30)
    loss_b = loss_a + 0.5  # B's loss is higher: A better
    r = compare_paired(loss_a, loss_b, higher_is_better=False)
    assert r.diff == pytest.approx(0.5) and r.low > 0
    noisy = compare_paired(np.random.default_rng(3).normal(size=(2, 40)), np.random.default_rng(4).normal(size=(2, 40)))
    assert noisy.mdd == pytest.approx((1.959964 + 0.841621) * noisy.se, rel=1e-5)
    assert noisy.se == pytest.approx(1 / math.sqrt(40), rel=0.35)  # sd of a mean of 2·40 N(0,2)/2 … order 1/√40


def test_holm_changes_a_verdict():
    """One clear claim and one borderline: the borderline p survives alone but not after Holm."""
    rng = np.random.default_rng(5)
    b = (rng.random((1, 200)) < 0.5).astype(float)
    clear = b.copy()
    clear[0, :60] = 1.0
    edge = b.copy()
    flips = np.flatnonzero(edge[0] == 0)[:16]
    edge[0, flips] = 1.0
    edge[0, np.flatnonzero(b[0] == 1)[:5]] = 0.0  # only-A 16, only-B 5: p = 2·P(X ≤ 5 | 21) ≈ .0266
    # one seed (McNemar keeps the p-values hand-checkable); min_seeds=1 isolates Holm from the seed rule
    alone = decide([compare_paired(edge, b)], min_seeds=1)[0]
    assert alone.p == pytest.approx(binom_two_sided(5, 21)) and alone.verdict == "A better"
    both = decide([compare_paired(clear, b), compare_paired(edge, b), compare_paired(b, b.copy())], min_seeds=1)
    assert both[1].p_holm == pytest.approx(min(1.0, 2 * alone.p))  # second smallest of 3: × 2
    assert both[1].verdict == "inconclusive" and both[0].verdict == "A better"


def test_bootstrap_is_seeded():
    a = np.random.default_rng(6).random((2, 30))
    b = np.random.default_rng(7).random((2, 30))
    r1, r2 = compare_paired(a, b), compare_paired(a, b)
    assert (r1.low, r1.high) == (r2.low, r2.high)
    with pytest.raises(ValueError):
        compare_paired(a, b[:, :10])


def test_one_seed_cannot_carry_a_verdict():
    """A large gain in one seed and a loss in the other: the item bootstrap alone would say "A better"."""
    b = np.zeros((2, 100))
    a = b.copy()
    a[0, :60] = 1.0  # seed 0: +0.6
    b[1, :10] = 1.0  # seed 1: −0.1
    r = decide([compare_paired(a, b)])[0]
    assert r.low > 0 and r.p_holm < 0.05 and r.per_seed == pytest.approx([0.6, -0.1])
    assert r.verdict == "inconclusive"


def test_one_seed_is_never_a_verdict_however_small_its_p():
    """60 of 100 items flip to A in the only seed: p ≈ 1e-18 and a CI far above 0, still no verdict. A second seed
    with the same gain gives one."""
    b = np.zeros((1, 100))
    a = b.copy()
    a[0, :60] = 1.0
    one = decide([compare_paired(a, b)])[0]
    assert one.p < 1e-15 and one.low > 0.4 and one.per_seed == pytest.approx([0.6])
    assert one.verdict == "inconclusive"
    two = decide([compare_paired(np.vstack([a, a]), np.vstack([b, b]))])[0]
    assert two.verdict == "A better"


def test_too_few_items_have_no_detectable_difference():
    """4 items: the sign flip's smallest p is 2/16 = .125 ≥ .05, so nothing is detectable, however large."""
    a, b = np.ones((2, 4)), np.zeros((2, 4))
    r = decide([compare_paired(a, b)])[0]
    assert r.p == pytest.approx(0.125) and r.mdd == math.inf and r.verdict == "inconclusive"
    assert compare_paired(np.ones((2, 5)), np.zeros((2, 5))).mdd == math.inf  # 2/32 = .0625
    assert compare_paired(np.ones((2, 6)), np.zeros((2, 6))).mdd < math.inf  # 2/64 < .05
    one = compare_paired(np.ones((1, 5)), np.zeros((1, 5)))  # McNemar, 5 discordant: 2/32 ≥ .05
    assert one.test == "mcnemar" and one.mdd == math.inf


def test_the_claims_table_shows_why_a_small_p_is_inconclusive():
    """The per-seed Δ column carries the seed that disagrees, in the README table and the terminal line."""
    from tunelab.lab.study import claim_line, claims_markdown

    b = np.zeros((2, 100))
    a = b.copy()
    a[0, :60] = 1.0
    b[1, :10] = 1.0
    r = decide([compare_paired(a, b)])[0]
    row = {"better": "A", "than": "B", "on": "t", "direction": "higher", **r.as_dict(), "outcome": "inconclusive"}
    table = claims_markdown([row])
    assert "| Δ per seed |" in table.splitlines()[0]
    cells = [c.strip() for c in table.splitlines()[2].split("|")]
    assert cells[4] == "+0.600, -0.100" and cells[-2] == "**inconclusive**"
    assert "per seed +0.600, -0.100" in claim_line(row)


def test_one_seed_says_so_in_the_verdict_and_an_unfinished_study_says_how_far_it_is():
    from tunelab.lab.study import claims_markdown, progress_line, study_html

    b = np.zeros((1, 100))
    a = b.copy()
    a[0, :60] = 1.0
    r = decide([compare_paired(a, b)])[0]
    row = {"better": "A", "than": "B", "on": "t", "direction": "higher", **r.as_dict(), "outcome": "inconclusive"}
    assert [c.strip() for c in claims_markdown([row]).splitlines()[2].split("|")][-2] == "**inconclusive (1 seed)**"
    parts = {"seeds": [0, 1, 2], "budgets": [{"variant": "A", "seeds": 1}, {"variant": "B", "seeds": 1}],
             "claims": [row], "warnings": [], "match": [], "provenance": "p"}
    assert progress_line(parts).startswith("In progress: 1 of 3 seeds finished (every variant)")
    assert "In progress" in study_html(parts) and "inconclusive (1 seed)" in study_html(parts)
    parts["budgets"][1]["seeds"] = 2
    assert "A 1, B 2" in progress_line(parts)
    parts["budgets"][0]["seeds"] = 3
    parts["budgets"][1]["seeds"] = 3
    assert progress_line(parts) == ""


def test_a_declared_margin_separates_real_from_mattering_by_hand():
    # every item and seed differs by exactly 0.125 (a loss, lower better): the bootstrap is degenerate at 0.125, so
    # every interval is [0.125, 0.125] and the sign flip over 20 equal items gives p = 2 / 2^20
    b = np.full((2, 20), 1.0)
    a = b - 0.125  # exact in binary
    plain = decide([compare_paired(a, b, higher_is_better=False)])[0]
    assert plain.verdict == "A better" and plain.margin is None and plain.eq_low is None
    small = decide([compare_paired(a, b, higher_is_better=False, margin=0.0625)])[0]
    assert small.verdict == "A better"  # 0.125 clears the margin
    big = decide([compare_paired(a, b, higher_is_better=False, margin=0.25)])[0]
    assert (big.eq_low, big.eq_high) == (0.125, 0.125) and big.verdict == "negligible"
    assert decide([compare_paired(b, a, higher_is_better=False, margin=0.25)])[0].verdict == "negligible"
    assert decide([compare_paired(b, a, higher_is_better=False, margin=0.0625)])[0].verdict == "B better"
    at = decide([compare_paired(a, b, higher_is_better=False, margin=0.125)])[0]  # neither beyond nor inside
    assert at.verdict == "inconclusive" and at.direction() == 1
    one = decide([compare_paired(a[:1], b[:1], higher_is_better=False, margin=0.25)])[0]
    assert one.verdict == "inconclusive"  # one seed: no verdict, "negligible" included
    with pytest.raises(ValueError, match="positive"):
        compare_paired(a, b, margin=0.0)


def test_the_equivalence_interval_is_tost_bonferroni_across_the_claims():
    rng = np.random.default_rng(5)
    b = rng.normal(1.0, 0.1, (3, 200))
    a = b + 0.003 + rng.normal(0, 0.01, (3, 200))  # a small real difference, noisy per item
    alone = decide([compare_paired(a, b, margin=0.02)])[0]
    # m = 1: the 90 % interval (TOST at α = .05), inside the 95 % CI; m = 5: the 98 % interval, wider than it
    assert (alone.eq_low, alone.eq_high) == pytest.approx(tuple(np.quantile(alone.boot, [0.05, 0.95])))
    assert alone.low < alone.eq_low < alone.eq_high < alone.high and alone.verdict == "negligible"
    five = decide([compare_paired(a, b, margin=0.02) for _ in range(5)])[0]
    assert (five.eq_low, five.eq_high) == pytest.approx(tuple(np.quantile(five.boot, [0.01, 0.99])))
    assert five.eq_low < five.low and five.high < five.eq_high
    assert decide([compare_paired(a, b)])[0].verdict == "A better"  # without a margin: real, so a verdict
    assert decide([compare_paired(a, b, margin=0.001)])[0].verdict == "A better"
    wide = decide([compare_paired(a, b, margin=0.0035)])[0]  # real, but its CI reaches below the margin
    assert wide.low < 0.0035 < wide.high and wide.verdict == "inconclusive" and wide.direction() == 1
    assert "boot" not in alone.as_dict() and alone.as_dict()["margin"] == 0.02

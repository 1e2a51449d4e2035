"""Advantage estimators (rl/advantages.py) against hand-computed values."""

import math

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.rl.advantages import ESTIMATORS, compute, dr_grpo, grpo, rloo, whiten

# two groups of G = 4 adjacent completions: mixed rewards, and one group with a tie
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 1.0, 3.0])


def _std(xs):  # unbiased, by hand
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_registry_names():
    assert set(ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    with pytest.raises(TunelabError, match="unknown advantage estimator 'ppo'"):
        compute("ppo", R, group_size=4)


def test_grpo_by_hand():
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: mean 2, std sqrt(4/3)
    s1, s2 = _std([1, 0, 0, 1]), _std([3, 1, 1, 3])
    assert s1 == pytest.approx(math.sqrt(1 / 3)) and s2 == pytest.approx(math.sqrt(4 / 3))
    want = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 1 / s2, -1 / s2, -1 / s2, 1 / s2]
    got = grpo(R, group_size=4)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    # the eps in the denominator: (r − mean) / (std + eps)
    got = grpo(R, group_size=4, eps=0.5)
    assert got[0].item() == pytest.approx(0.5 / (s1 + 0.5), rel=1e-6)


def test_grpo_std_is_unbiased_like_torch_and_trl():
    r = torch.tensor([0.3, 1.7, -0.2, 2.5])
    want = (r - r.mean()) / (r.std() + 1e-6)  # torch.std: Bessel-corrected, as TRL's nanstd
    torch.testing.assert_close(grpo(r, group_size=4), want)


def test_dr_grpo_and_no_std_scaling_are_centred_rewards():
    want = [0.5, -0.5, -0.5, 0.5, 1.0, -1.0, -1.0, 1.0]
    assert dr_grpo(R, group_size=4).tolist() == pytest.approx(want)
    assert grpo(R, group_size=4, scale_by_std=False).tolist() == pytest.approx(want)


def test_rloo_by_hand():
    # A_i = r_i − mean of the other three
    want = []
    for g in (R[:4].tolist(), R[4:].tolist()):
        for i, r in enumerate(g):
            others = g[:i] + g[i + 1:]
            want.append(r - sum(others) / 3)
    assert want[:4] == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    got = rloo(R, group_size=4)
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    # = G/(G−1) · (r − mean)
    torch.testing.assert_close(got, 4 / 3 * dr_grpo(R, group_size=4))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_group_gets_zero_advantage(name):
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    adv = compute(name, r, group_size=4)
    assert adv[:8].abs().max().item() == 0.0  # always solved, never solved: no signal
    assert adv[8:].abs().min().item() > 0
    assert torch.isfinite(adv).all()


def test_group_index_equals_group_size_and_allows_any_order_and_sizes():
    idx = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])
    for name in ESTIMATORS:
        torch.testing.assert_close(compute(name, R, idx), compute(name, R, group_size=4))
    # rows of a group need not be adjacent; labels are arbitrary; group sizes may differ
    perm = torch.tensor([4, 0, 5, 1, 6, 2, 7, 3])
    for name in ESTIMATORS:
        torch.testing.assert_close(compute(name, R[perm], idx[perm]), compute(name, R, idx)[perm])
    r = torch.tensor([1.0, 0.0, 2.0, 4.0, 6.0])
    got = rloo(r, torch.tensor([0, 0, 1, 1, 1]))
    assert got.tolist() == pytest.approx([1.0, -1.0, 2 - 5, 4 - 4, 6 - 3])
    got = grpo(r, torch.tensor([0, 0, 1, 1, 1]))
    assert got[2:].tolist() == pytest.approx([-2 / 2, 0.0, 2 / 2], rel=1e-5)  # group mean 4, std 2


def test_group_of_one():
    r = torch.tensor([0.7, 0.2])
    with pytest.raises(TunelabError, match="rloo needs at least 2 completions per prompt"):
        rloo(r, group_size=1)
    with pytest.raises(TunelabError, match="group of 1"):
        rloo(torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0, 0, 1]))
    # GRPO / Dr. GRPO: a lone completion is its own mean → advantage 0 (TRL), never NaN
    assert grpo(r, group_size=1).tolist() == [0.0, 0.0]
    assert dr_grpo(r, group_size=1).tolist() == [0.0, 0.0]


def test_bad_inputs():
    with pytest.raises(TunelabError, match="do not split into groups of 3"):
        grpo(R, group_size=3)
    with pytest.raises(ValueError, match="exactly one of"):
        grpo(R)
    with pytest.raises(ValueError, match="exactly one of"):
        grpo(R, torch.zeros(8), group_size=4)
    with pytest.raises(TunelabError, match="NaN or infinite"):
        grpo(torch.tensor([1.0, float("nan")]), group_size=2)
    with pytest.raises(ValueError, match=r"\[B\]"):
        grpo(torch.zeros(2, 2), group_size=2)


def test_dtype_and_integer_rewards():
    assert grpo(torch.tensor([1, 0, 0, 1]), group_size=2).dtype == torch.float32
    assert rloo(torch.tensor([1.0, 0.0], dtype=torch.float64), group_size=2).dtype == torch.float64


def test_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, var = 2.5, 5 / 3  # unbiased variance
    want = [(v - mean) / math.sqrt(var + 1e-8) for v in x.tolist()]
    assert whiten(x).tolist() == pytest.approx(want, rel=1e-6)
    assert whiten(x, shift_mean=False).tolist() == pytest.approx([w + mean for w in want], rel=1e-6)
    # statistics over the mask only; the unmasked entry is transformed with them
    x2 = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    got = whiten(x2, mask)
    assert got[mask].tolist() == pytest.approx([want[0], want[1], want[2], want[3]], rel=1e-6)
    assert got[0, 2].item() == pytest.approx((100 - mean) / math.sqrt(var + 1e-8), rel=1e-6)
    w = whiten(torch.randn(1000) * 3 + 7)
    assert w.mean().item() == pytest.approx(0.0, abs=1e-5) and w.std().item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.tensor([True, False, False, False]))


def test_huge_finite_rewards_are_blamed_for_what_overflows():
    """±1e308 is a finite reward: it overflows float32 (the rollout's dtype), or its group's spread overflows —
    said as such, not as "NaN"."""
    with pytest.raises(TunelabError, match=r"infinite or beyond torch.float32's range \(±3.4e\+38\)"):
        grpo(torch.tensor([1e308, -1e308]), group_size=2)
    for r in (torch.tensor([1e20, -1e20]), torch.tensor([1e308, 1e308], dtype=torch.float64)):
        for estimator in (grpo, rloo):  # silently zero (std = inf) or NaN (mean = inf) advantages before
            with pytest.raises(TunelabError, match="group mean or spread overflows") as e:
                estimator(r, group_size=2)
            assert "NaN" not in str(e.value)

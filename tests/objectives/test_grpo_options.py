"""GRPO's issue-24 options (objectives/policy_loss.py wired into objectives/grpo.py): GSPO's sequence-level ratio
(and GSPO-token), DAPO's overlong filtering and the entropy bonus — each against a hand-computed case and against
TRL 1.16's `GRPOTrainer._compute_loss` on identical inputs (the harness of test_grpo_loss.py)."""

import math

import pytest
import torch

from tests.objectives.test_grpo_loss import ADV, MAXLEN, OLD_DELTA, REF_DELTA, hand_logps, make, model, shifted, \
    trl_loss  # noqa: F401  (model: the fixture)
from tunelab.errors import TunelabError
from tunelab.objectives.grpo import GRPO
from tunelab.objectives.policy_loss import entropy_bonus, gspo_pg, mismatch, overlong_mask, sequence_ratio


def _batch(model, temperature=1.0, **kw):
    lp = hand_logps(model, temperature=temperature)
    return make(old=shifted(lp, OLD_DELTA), ref=shifted(lp, REF_DELTA), **kw)


# ------------------------------------------------------------------------------------------------ by hand
def test_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, -0.7, -9.0]])
    old = torch.tensor([[0.0, -1.2, -1.5, 0.0], [0.0, -0.4, -0.9, -1.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, True, False]])
    s = sequence_ratio(logp, old, mask)
    # row 0: (0.2 − 0.5)/2 = −0.15; row 1: (−0.1 + 0.2)/2 = 0.05 (the unmasked −8 is ignored)
    assert s.squeeze(-1).tolist() == pytest.approx([math.exp(-0.15), math.exp(0.05)], rel=1e-6)
    tok = sequence_ratio(logp, old, mask, per_token=True)
    assert torch.allclose(tok, s.expand_as(tok))  # GSPO-token: the same values


@pytest.mark.parametrize("eps", [0.2, 3e-4])
def test_gspo_loss_by_hand(model, eps):
    batch, _ = _batch(model)
    loss_sum, n, m = GRPO(epsilon=eps, importance_sampling="sequence").loss(model, batch)
    s = [math.exp(-sum(d) / len(d)) for d in OLD_DELTA]  # log ρ_t = −δ_t
    want = 0.0
    for i, (si, A) in enumerate(zip(s, ADV)):
        pg = -min(si * A, min(max(si, 1 - eps), 1 + eps) * A)
        want += pg * len(OLD_DELTA[i])
    assert int(n) == 6 and loss_sum.item() == pytest.approx(want, abs=1e-5)
    assert m["ratio"] == pytest.approx((4 * s[0] + 2 * s[1]) / 6, abs=1e-5)
    # ε = 0.2: s_0 = e^0.025, s_1 = e^−0.2 ≈ 0.819 both inside; ε = 3e-4: both clipped (s_1 < 1 − ε with A < 0)
    assert m["clip_fraction"] == (0.0 if eps == 0.2 else 1.0)


def test_gspo_token_equals_gspo_with_one_advantage_per_row(model):
    """GSPO-token's value and, with sequence-level advantages, its gradient are GSPO's."""
    batch, _ = _batch(model)
    params = list(model.parameters())
    a, _, _ = GRPO(epsilon=0.3, importance_sampling="sequence").loss(model, batch)
    b, _, _ = GRPO(epsilon=0.3, importance_sampling="sequence_token").loss(model, batch)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    for ga, gb in zip(torch.autograd.grad(a, params), torch.autograd.grad(b, params)):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)
    # with per-token advantages the two differ (GSPO-token's reason to exist): the pure functions
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old, mask, A = torch.tensor([[-1.1, -1.9]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[1.0, -3.0]])
    g_seq = torch.autograd.grad(gspo_pg(logp, old, A, mask, 0.5)[0].sum(), logp)[0]
    g_tok = torch.autograd.grad(gspo_pg(logp, old, A, mask, 0.5, per_token=True)[0].sum(), logp)[0]
    s = math.exp((0.1 - 0.1) / 2)
    # GSPO: d/dlogp_t Σ_u −s·A_u = −s·ΣA/|y|; GSPO-token: −s·A_t
    assert g_seq[0].tolist() == pytest.approx([-s * (1 - 3) / 2] * 2, abs=1e-6)
    assert g_tok[0].tolist() == pytest.approx([-s * 1.0, s * 3.0], abs=1e-6)


def test_overlong_filtering_masks_truncated_rows(model):
    batch, _ = _batch(model)
    batch["truncated"] = torch.tensor([False, True])
    full = GRPO().loss(model, {k: v for k, v in batch.items() if k != "truncated"})
    on = GRPO(mask_truncated=True).loss(model, batch)
    alone = GRPO().loss(model, make([([1, 17, 33, 5, 9], [40, 41, 42, 2])], [ADV[0]],
                                    [shifted(hand_logps(model), OLD_DELTA)[0]])[0])
    assert int(on[1]) == 4 and int(full[1]) == 6  # row 1's 2 tokens left the loss and the normaliser
    assert on[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    assert GRPO(mask_truncated=False).loss(model, batch)[0].item() == pytest.approx(full[0].item(), abs=1e-6)
    m = overlong_mask(torch.ones(3, 2, dtype=torch.bool), torch.tensor([True, False, True]))
    assert m.tolist() == [[False, False], [True, True], [False, False]]


def test_entropy_bonus_subtracts_c_times_the_mean_entropy(model):
    batch, _ = _batch(model)
    base_sum, n, m = GRPO().loss(model, batch)
    bonus_sum, n2, m2 = GRPO(entropy_coef=0.05).loss(model, batch)
    assert int(n) == int(n2) == 6
    assert (bonus_sum - base_sum).item() == pytest.approx(-0.05 * m["entropy"] * 6, abs=1e-5)
    # the bonus has a gradient (the entropy metric alone has none)
    g = torch.autograd.grad(bonus_sum - base_sum, list(model.parameters()), allow_unused=True)
    assert any(x is not None and x.abs().max() > 0 for x in g)
    assert entropy_bonus(torch.tensor([1.0, 2.0]), 0.1).tolist() == pytest.approx([-0.1, -0.2])


def test_mismatch_metric_by_hand():
    sampler = torch.tensor([[0.0, -1.0, -2.0, -3.0]])
    trainer = torch.tensor([[5.0, -1.1, -1.7, -9.0]])
    mask = torch.tensor([[False, True, True, False]])
    # differences on the mask: 0.1, −0.3 → mean −0.1, max |·| 0.3 (the unmasked 5 and 6 are ignored)
    assert mismatch(sampler, trainer, mask) == pytest.approx({"mismatch_kl": -0.1, "mismatch_max_abs_logp": 0.3})
    assert mismatch(sampler, trainer, torch.zeros_like(mask)) == {"mismatch_kl": 0.0, "mismatch_max_abs_logp": 0.0}


def test_unknown_importance_sampling_is_one_line():
    with pytest.raises(TunelabError, match="unknown importance_sampling 'seq'"):
        GRPO(importance_sampling="seq")


# ------------------------------------------------------------------------------------------------- TRL
def _compare(model, obj, inputs, batch, **trl_kw):
    theirs, m_copy, _ = trl_loss(model, inputs, "dapo", obj.beta, obj.epsilon, obj.epsilon_high, obj.temperature,
                                 **trl_kw)
    loss_sum, n, _ = obj.loss(model, batch)
    ours = loss_sum / n
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    for a, b in zip(torch.autograd.grad(ours, list(model.parameters())),
                    torch.autograd.grad(theirs, list(m_copy.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("eps", [0.2, 3e-4])
def test_gspo_equals_trl_sequence_level(model, eps):
    batch, inputs = _batch(model, temperature=0.7)
    obj = GRPO(beta=0.04, epsilon=eps, temperature=0.7, importance_sampling="sequence", max_completion_length=MAXLEN)
    _compare(model, obj, inputs, batch, importance_sampling_level="sequence")


def test_overlong_filtering_equals_trl_mask_truncated_completions(model):
    """TRL zeroes a truncated row's completion_mask when it generates (`mask_truncated_completions`); the same
    inputs with that mask give its loss and gradient; ours reads the rows' `truncated` flag."""
    batch, inputs = _batch(model, temperature=0.7)
    batch["truncated"] = torch.tensor([True, False])
    inputs["completion_mask"] = inputs["completion_mask"] * torch.tensor([[0], [1]])
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    obj = GRPO(beta=0.04, epsilon=0.2, epsilon_high=0.28, temperature=0.7, mask_truncated=True)
    _compare(model, obj, inputs, batch)


def test_entropy_bonus_equals_trl_entropy_coef(model):
    batch, inputs = _batch(model, temperature=0.7)
    obj = GRPO(beta=0.04, epsilon=0.2, epsilon_high=0.28, temperature=0.7, entropy_coef=0.05)
    _compare(model, obj, inputs, batch, _entropy_bonus_enabled=True, entropy_coef=0.05, use_adaptive_entropy=False)

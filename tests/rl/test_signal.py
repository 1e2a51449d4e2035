"""Zero-signal groups: the share of prompt groups whose completions all scored the same (advantage, loss and
gradient 0), hand-computed; the warning after N such rounds in a row, once; only for group-relative modes."""

import torch

from tunelab.rl.rows.best_of_n import BestOfNRows
from tunelab.rl.rows.pairs import PairRows
from tunelab.rl.rows.policy_gradient import PolicyGradientRows
from tunelab.rl.rows.ppo import PPORows

from tunelab.rl.advantages import ESTIMATORS
from tunelab.rl.signal import NoSignalWatch, zero_signal_groups

GROUP = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_share_of_flat_groups_is_hand_computed_and_matches_zero_advantages():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # groups 0 and 2 flat, group 1 not
    assert zero_signal_groups(rewards, GROUP) == 2 / 3
    adv = ESTIMATORS["grpo"](rewards, GROUP)
    flat = [g for g in range(3) if (adv[GROUP == g] == 0).all()]
    assert flat == [0, 2]  # exactly the groups counted: their advantages are all 0
    assert zero_signal_groups(torch.tensor([0.5, 0.5]), torch.tensor([0, 0])) == 1.0


def test_warns_once_after_n_flat_rounds_in_a_row(capsys):
    watch = NoSignalWatch(3)
    flat, mixed = torch.zeros(9), torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 0])
    rounds = [flat, flat, mixed, flat, flat, flat, flat, flat]  # the mixed round resets the count
    shares = [watch.round(PolicyGradientRows.group_relative, r, GROUP)["zero_signal_groups"] for r in rounds]
    assert shares == [1.0, 1.0, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0]
    err = capsys.readouterr().err
    assert err.count("warning: no learning signal for 3 rounds") == 1 and "mean 0.000" in err


def test_not_for_ppo_or_rejection_sampling_nor_when_switched_off(capsys):
    flat = torch.zeros(9)
    for builder in (PPORows, BestOfNRows):  # their signal is not the spread within a group
        watch = NoSignalWatch(1)
        assert watch.round(builder.group_relative, flat, GROUP) == {}
    off = NoSignalWatch(0)
    for _ in range(10):
        off.round(PairRows.group_relative, flat, GROUP)
    assert capsys.readouterr().err == ""

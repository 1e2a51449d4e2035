"""Row builders (rl/rows/): what rejection sampling keeps, how online DPO pairs, and runs that show it.

Rejection sampling must not imitate wrong answers (a group with no completion reaching ``rl.keep_threshold``
contributes nothing, ``keep: best`` included); online DPO must not train on a pair of identical completions (a
tied group forms no pair and is left out of the loss's denominator)."""

import math

import pytest
import torch

from tests.rl.test_rl_runs import REWARDS, _rows, _train_rows, config, toy  # noqa: F401
from tunelab.objectives import load_run_config as load_config
from tunelab.train.launch import train

ZERO = f"{REWARDS}:zero"


def test_best_of_n_keeps_only_what_reaches_the_threshold():
    from tunelab.rl.rows.best_of_n import kept

    rewards = torch.tensor([0.0, 0.0, 0.0,   1.0, 0.0, 1.0,   0.4, 0.9, 0.2])
    assert kept(rewards, 3, "best", 1.0) == [3]  # group 0 all wrong: nothing; group 1: its first best
    assert kept(rewards, 3, "best", 0.5) == [3, 7]
    assert kept(rewards, 3, "threshold", 1.0) == [3, 5]
    assert kept(rewards, 3, "threshold", 0.0) == list(range(9))


def test_pairs_are_two_different_completions_and_ties_form_none():
    from tunelab.rl.rows.pairs import pair_scores, pick_pairs

    scores = torch.tensor([0.5, 0.5, 0.5,   1.0, 0.0, 1.0,   0.0, 0.0, 1.0])
    chosen, rejected, tied = pick_pairs(scores, 3)
    assert (chosen, rejected, tied) == ([3, 8], [4, 6], 1)
    assert all(c != r for c, r in zip(chosen, rejected))
    # TRL's missing_eos_penalty: an unfinished completion's score drops, and with it its place in the pair
    s = pair_scores(torch.tensor([1.0, 0.9]), torch.tensor([True, False]), missing_eos_penalty=0.5)
    assert s.tolist() == pytest.approx([0.5, 0.9])
    assert pick_pairs(s, 2)[:2] == ([1], [0])
    assert pick_pairs(torch.tensor([1.0, 0.9]), 2)[:2] == ([0], [1])


def test_rejection_sampling_never_trains_on_wrong_answers(config):
    # every completion scores 0 (all wrong): the default keep (best of each group) used to keep each group's
    # "best" wrong answer and train on it
    out = train(load_config(config("rejection_sampling", train={"max_steps": 2}, rl={"rewards": [{"name": ZERO}]})))
    rows = _train_rows(out)
    assert [(r["kept"], r["kept_of"], r["loss"], r["n_loss_units"]) for r in rows] == [(0, 2, 0.0, 0)] * 2
    assert (out / "selected.jsonl").read_text() == ""


def test_online_dpo_forms_no_pair_from_a_tied_group(config):
    # every group tied: chosen ≡ rejected used to be trained on (a zero-gradient pair counted in the denominator)
    out = train(load_config(config("online_dpo", method="lora", train={"max_steps": 2},
                                   rl={"rewards": [{"name": ZERO}]})))
    rows = _train_rows(out)
    assert [(r["tied_groups"], r["pairs"], r["n_loss_units"], r["loss"]) for r in rows] == [(2, 0, 0, 0.0)] * 2
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] == 0.0 for r in rows)


def test_online_dpo_missing_eos_penalty_is_an_option(config):
    cfg = load_config(config("online_dpo", online_dpo={"missing_eos_penalty": 1.0}))
    assert cfg.online_dpo.missing_eos_penalty == 1.0
    from tunelab.objectives import build_objective

    assert build_objective(cfg).missing_eos_penalty == 1.0  # what the row builder reads

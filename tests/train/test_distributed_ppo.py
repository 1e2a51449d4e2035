"""PPO and REINFORCE++ under torchrun (CPU, gloo, 2 processes): 2 ranks × b rows reproduce 1 process × 2b rows.

A PPO round normalises over the whole round — the sequence scores (``ppo.reward_norm``), the GAE advantages
(``ppo.whiten_advantages``) and the adaptive KL controller's mean KL — so each rank normalising its own rows
gives another loss than one process, and β drifts apart across ranks. Here the statistics are all-reduced
(rl/collective.py) and the curves must agree to fp32 reduction-order error (as test_distributed.py asserts for
the other objectives). REINFORCE++ (``grpo.advantage: reinforce_pp_baseline``) normalises its advantages over the
whole round, every rank's rows, in the same way. Sampling is made rank-independent by a test sampler
(`tests/rl/rank_free_sampler.py`): each prompt's completions depend on the prompt alone, so both runs train on
the same completions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import save_tiny_model, train_losses, write_config, write_jsonl
from tunelab.objectives import load_run_config as load_config
from tunelab.rl.sampler import SAMPLERS
from tunelab.train.launch import train

REPO = Path(__file__).resolve().parents[2]
TOL = dict(rel=2e-6, abs=2e-7)  # abs: on-policy PPO losses are near 0 (whitened A)
SAMPLER = "tests.rl.rank_free_sampler:RankFreeSampler"
WEIGHT_TOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    from tests.rl.rank_free_sampler import RankFreeSampler

    root = tmp_path_factory.mktemp("dist-ppo")
    model = save_tiny_model(root / "tiny", tokenizer)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Say something about {w}.", "answer": "x"}
                                                   for w in "abcdefghijklmnop"])

    def config(name, objective="ppo", **train_over):
        cfg = {"output_dir": str(root / name), "method": "lora", "objective": objective, "model": {"name": str(model)},
               "data": {"train": str(prompts), "max_length": 64, "eval_max": 2},
               "lora": {"r": 4, "dropout": 0.0},
               "train": {"max_steps": 4, "batch_size": 8, "lr": 5e-3, "warmup_steps": 0, **train_over},
               "rl": {"group_size": 2, "prompts_per_step": 4, "max_new_tokens": 8, "temperature": 1.0,
                      "eval_prompts": 0, "sampler": "rank_free", "ppo_epochs": 2,
                      "rewards": [{"name": "tests.rl.rank_free_sampler:even_share"}]},
               "samples": {"n_heldout": 0}}
        if objective == "ppo":
            cfg["ppo"] = {"beta": 0.05, "reward_norm": True, "whiten_advantages": True, "adaptive_kl": True,
                          "kl_target": 0.01, "kl_horizon": 10}
        else:  # REINFORCE++-baseline: the group mean, then (d − μ_B) / σ_B over the round
            cfg["grpo"] = {"advantage": "reinforce_pp_baseline", "beta": 0.0}
        return str(write_config(root / f"{name}.yaml", **cfg))

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SAMPLERS, "rank_free", RankFreeSampler)
        train(load_config(config("one")))  # 1 process × 8 rows
        train(load_config(config("one-rpp", objective="grpo")))
    jobs = [{"config": config("two", batch_size=4), "overrides": ["parallel=ddp"],  # 2 ranks × 4 rows, the same
             "samplers": {"rank_free": SAMPLER}},                                   # global batch
            {"config": config("two-rpp", objective="grpo", batch_size=4), "overrides": ["parallel=ddp"],
             "samplers": {"rank_free": SAMPLER}}]
    (root / "spec.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests" / "train" / "dist_driver.py"), str(root / "spec.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("two", "two-rpp"):
        assert not (root / f"{name}.error").exists(), (root / f"{name}.error").read_text()
    return root


def _train_rows(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_ranks_reproduce_one_process_for_ppo(runs):
    one, two = runs / "one", runs / "two"
    ours, theirs = [loss for _, loss in train_losses(two)], [loss for _, loss in train_losses(one)]
    assert len(ours) == len(theirs) == 4  # 2 rounds × 2 passes
    # round 0 (steps 1-2): the same rows, the same statistics — fp32 reduction-order error only
    assert ours[:2] == pytest.approx(theirs[:2], **TOL)
    # round 1: its per-token KL to the reference is a difference of two nearly equal fp32 log-probs (~0.004
    # here), which turns the weights' ~1e-7 reduction-order difference into ~1e-5 relative in the rewards;
    # per-rank statistics (the bug) differ by whole percent from round 0 on
    assert ours[2:] == pytest.approx(theirs[2:], rel=1e-3)
    assert len(set(theirs)) == len(theirs)  # the curve moves
    a, b = _train_rows(one), _train_rows(two)
    assert [r["n_loss_units"] for r in a] == [r["n_loss_units"] for r in b]
    # β: the controller moved (kl_target is small) and every rank holds the single process's value — the
    # logged kl_coef of the 2-rank run is the mean over ranks, equal to it only if neither rank drifted
    betas = [r["kl_coef"] for r in a]
    assert betas[0] == pytest.approx(0.05) and betas[-1] != pytest.approx(0.05)
    assert [r["kl_coef"] for r in b] == pytest.approx(betas, rel=1e-6)
    assert json.loads((two / "results.json").read_text())["steps"] == 4
    # the weights: the policy's adapter and the value head. (Not the value model's own adapter: its gradient is
    # exactly 0 until the zero-initialised head has moved, so its first Adam step, lr·g/|g|, comes from
    # gradients so small that fp32 reduction order decides their sign — an lr-sized difference per element.)
    for name, keys in (("adapter/adapter_model.safetensors", ""), ("value_model.safetensors", "head.")):
        mine, ref = (load_file(str(run / name)) for run in (two, one))
        assert mine.keys() == ref.keys()
        diff = max(float((mine[k] - ref[k]).abs().max()) for k in ref if k.startswith(keys))
        assert diff < WEIGHT_TOL, (name, diff)


def test_two_ranks_reproduce_one_process_for_reinforce_pp(runs):
    """REINFORCE++'s μ_B and σ_B are the round's, over both ranks: the same advantages, so the same updates (per-rank
    statistics — each rank normalising its own 4 rows — give other advantages from the first step on). The losses
    themselves say little here: on-policy, with advantages of mean 0 over the round, they are ~1e-8 either way."""
    one, two = runs / "one-rpp", runs / "two-rpp"
    a, b = _train_rows(one), _train_rows(two)
    assert len(a) == len(b) == 4
    assert [r["advantage_abs"] for r in b] == pytest.approx([r["advantage_abs"] for r in a], rel=1e-5)
    assert a[0]["advantage_abs"] > 0.1  # the rewards differ: the advantages are not all 0
    assert [r["n_loss_units"] for r in a] == [r["n_loss_units"] for r in b]
    mine, ref = (load_file(str(run / "adapter/adapter_model.safetensors")) for run in (two, one))
    assert max(float(ref[k].abs().max()) for k in ref if "lora_B" in k) > 100 * WEIGHT_TOL  # B starts at 0: it moved
    diff = max(float((mine[k] - ref[k]).abs().max()) for k in ref)
    assert diff < WEIGHT_TOL, diff

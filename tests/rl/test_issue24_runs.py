"""Issue-24 options in runs on the toy of test_rl_runs (a tiny random llama, reward = share of even token ids):
the train–inference mismatch in every online run's metrics.jsonl, π_old recomputed by the trainer, DAPO's
dynamic sampling, PPO's critic warm-up; and a reward model scoring a truncated completion without closing its
turn (defect 7)."""

import math

import pytest
import torch

from tests.rl.test_rl_runs import _results, _train_rows, config, toy  # noqa: F401  (fixtures)
from tunelab.objectives import load_run_config as load_config, validate_run_config
from tunelab.train.launch import train


@pytest.mark.parametrize("objective", ["grpo", "rloo", "ppo"])
def test_every_online_run_logs_the_mismatch(objective, config):
    out = train(load_config(config(objective, train={"max_steps": 2})))
    rows = _train_rows(out)
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["mismatch_kl"]) and 0 <= r["mismatch_max_abs_logp"] < 1e-4, r  # fp32 CPU: agree
    res = _results(out)  # the run's summary, and the comparison report's columns
    assert res["mismatch_max_abs_logp"] == max(r["mismatch_max_abs_logp"] for r in rows)
    assert res["mismatch_kl"] == pytest.approx(sum(r["mismatch_kl"] for r in rows) / 2, abs=1e-12)
    from tunelab.lab.results import build_table, load_run

    cols, table = build_table([load_run(out)])
    assert "mismatch_max_abs_logp" in [c.key for c in cols]
    assert table[0]["mismatch_max_abs_logp"] == res["mismatch_max_abs_logp"]


def _rows_for(tiny, tokenizer, delta: float):
    """Two sampled rows of a tiny model with the 'sampler' log-probs off the trainer's by `delta` per token."""
    from tunelab.rl.old_policy import trainer_logprobs

    model = tiny("llama")
    ids = torch.randint(5, 900, (2, 7))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    rows = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6 + [0], [1] * 7]), "loss_mask": mask,
            "prompt_mask": torch.tensor([[1, 1, 1, 0, 0, 0, 0]] * 2, dtype=torch.bool),
            "prompt_index": torch.tensor([0, 1])}
    rows["position_ids"] = (rows["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    trainer = trainer_logprobs(model, rows, 1, temperature=0.7)
    rows["old_logprobs"] = (trainer + delta) * mask
    return model, rows, trainer


@pytest.mark.parametrize("recompute", [False, True])
def test_old_logprobs_recomputed_by_the_trainer(tiny, tokenizer, recompute):
    from tunelab.rl.old_policy import settle_old_logprobs

    model, rows, trainer = _rows_for(tiny, tokenizer, 0.25)
    sampler = rows["old_logprobs"].clone()
    cfg = validate_run_config({"objective": "grpo", "rl": {"temperature": 0.7},
                               "grpo": {"recompute_old_logprobs": recompute}})
    from tunelab.objectives import build_objective

    m = settle_old_logprobs(rows, model, build_objective(cfg), cfg, micro=2)
    assert m["mismatch_kl"] == pytest.approx(0.25, abs=1e-5) and m["mismatch_max_abs_logp"] == pytest.approx(0.25,
                                                                                                            abs=1e-5)
    want = trainer * rows["loss_mask"] if recompute else sampler
    torch.testing.assert_close(rows["old_logprobs"] * rows["loss_mask"], want * rows["loss_mask"], atol=1e-6,
                               rtol=0)


def test_recomputed_old_logprobs_in_a_run(config):
    out = train(load_config(config("grpo", train={"max_steps": 2}, grpo={"recompute_old_logprobs": True})))
    for r in _train_rows(out):  # one micro-batch per round: on-policy, and π_old is the trainer's own forward
        assert r["ratio"] == pytest.approx(1.0, abs=1e-5) and "mismatch_kl" in r


def test_dynamic_sampling_samples_more_and_keeps_the_round_size(config):
    """A greedy-like sampler (temperature 1e-4): a prompt's G completions are identical, so are their rewards —
    no group is informative, the source samples the capped number of extra passes, then fills the round."""
    out = train(load_config(config("grpo", train={"max_steps": 2}, rl={"temperature": 1e-4},
        grpo={"dynamic_sampling": True, "dynamic_sampling_max_rounds": 2})))
    rows = _train_rows(out)
    assert len(rows) == 2 and all(r["completion_len"] > 0 for r in rows)  # the round kept its P·G rows
    for r in rows:
        assert r["dynamic_sampling_informative"] == 0.0 and r["dynamic_sampling_extra_passes"] == 2
        assert r["dynamic_sampling_filled"] == 2  # P = 2 uninformative groups fill the round
        assert r["adv_mean"] == 0.0 and r["adv_std"] == 0.0
    # the budget counts every pass: 2 rounds × (the first pass + 2 extra) × P·G completions
    from tests.rl.test_rl_runs import G, P

    assert _results(out)["budget"]["completions_sampled"] == 2 * 3 * P * G


def test_ppo_critic_warmup_and_entropy_bonus_run(config):
    out = train(load_config(config("ppo", method="lora", train={"max_steps": 2, "batch_size": 8},
                                   ppo={"entropy_coef": 0.01, "value_warmup_rounds": 1})))
    rows = _train_rows(out)
    assert [r["value_warmup"] for r in rows] == [1.0, 0.0]  # a round per step: round 0 trains V only
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_ppo_refuses_grpo_only_options(config):
    from tunelab.errors import TunelabError

    for key, value in (("importance_sampling", "sequence"), ("mask_truncated", True), ("dynamic_sampling", True)):
        with pytest.raises(TunelabError, match=f"ppo.{key}: unknown key"):  # grpo/rloo's section only
            train(load_config(config("ppo", ppo={key: value})))


# -------------------------------------------------------------------------------------------- defect 7
def test_reward_model_scores_a_truncated_completion_unclosed(tiny, tokenizer, tmp_path):
    from tests.rl.test_ppo import _reward_run
    from tunelab.objectives.reward import load_reward_model, rewards
    from tunelab.rl.rewards import RewardInputs, build_rewards

    run = _reward_run(tmp_path, tiny, tokenizer, "full")
    rm = load_reward_model(run, "cpu")
    prompt, text = [{"role": "user", "content": "Count to three."}], " one two thr"
    fn = build_rewards([{"name": "reward_model", "run_dir": str(run)}])
    batch = RewardInputs([text, text], [{"messages": prompt + [{"role": "assistant", "content": "x"}]}] * 2,
                         None, ["length", "stop"], [prompt, prompt])
    cut, closed = fn(batch).total
    ids = rm.tokenizer(rm.template.generation_prompt(prompt) + text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        by_hand = float(rewards(rm.model.eval(), {"input_ids": torch.tensor([ids]),
                                                  "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})[0])
    assert cut == pytest.approx(by_hand, abs=1e-5)  # the prompt + the text as sampled, no end of turn
    assert closed == pytest.approx(rm.score(prompt, text), abs=1e-6) and abs(cut - closed) > 1e-4


def test_ppo_early_stop_leaves_the_weights_exactly_as_they_were(config):
    """Defect 5 in a PPO run: the steps after the approx-KL stop of a round hold no loss unit; their checkpoints'
    weights (policy and value model) equal the previous step's, though AdamW has momentum and weight decay."""
    from safetensors.torch import load_file

    out = train(load_config(config("ppo", method="lora", rl={"ppo_epochs": 4}, ppo={"target_kl": 1e-6},
                                   train={"max_steps": 4, "batch_size": 2, "lr": 5e-2, "weight_decay": 0.1,
                                          "save_every": 1, "keep_last": 10})))
    rows = _train_rows(out)
    stopped = [r["step"] for r in rows if r["early_stopped"] == 1.0 and r["n_loss_units"] == 0]
    assert stopped and stopped[0] > 1, rows  # the first minibatch of the round trained, then the stop
    for step in stopped:
        if step == 4:  # no checkpoint is written at the last step (the run's artifacts are)
            continue
        a = load_file(str(out / "checkpoints" / f"step-{step - 1:06d}" / "trainable.safetensors"))
        b = load_file(str(out / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


def test_grpo_run_with_gspo_overlong_filtering_entropy_bonus_and_reinforce_pp(config):
    """The options wired end to end: a run with all of them trains and logs; every toy completion runs into
    max_new_tokens (12) here, so overlong filtering leaves no loss unit and the steps move nothing."""
    out = train(load_config(config("grpo", train={"max_steps": 2}, grpo={
        "importance_sampling": "sequence", "epsilon": 3e-4, "entropy_coef": 0.01, "advantage": "reinforce_pp",
        "mask_truncated": True})))
    rows = _train_rows(out)
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["entropy"])
        assert r["truncated"] == 1.0 and r["n_loss_units"] == 0 and r["loss"] == 0.0
        # REINFORCE++ whitens over the round's tokens: 8 rows × 12 tokens each, so the per-row std of the
        # advantages is sqrt(unbiased row variance / unbiased token variance) = sqrt((96 − 1) / (12 · 7))
        assert r["adv_std"] == pytest.approx(math.sqrt(95 / 84), abs=1e-3)
    out = train(load_config(config("grpo", name="no_mask", train={"max_steps": 2}, grpo={
        "importance_sampling": "sequence_token", "advantage": "reinforce_pp_baseline"})))
    assert all(r["n_loss_units"] > 0 and math.isfinite(r["loss"]) for r in _train_rows(out))


def test_a_reward_model_run_scores_the_sampled_ids_and_hints_at_the_penalty(config, tiny, tokenizer, tmp_path, capfd):
    """End to end: the rollout hands the reward model the sampled ids and the policy's tokenizer (same vocabulary and
    template here: no fallback line), and the toy's completions, all cut at max_new_tokens, get the one-line hint
    about ppo.missing_eot_penalty — once, though both rounds are cut."""
    from tests.rl.test_ppo import _reward_run

    run = _reward_run(tmp_path, tiny, tokenizer, "full")
    rewards = [{"name": "reward_model", "run_dir": str(run), "device": "cpu"}]
    out = train(load_config(config("ppo", method="lora", rl={"rewards": rewards, "eval_prompts": 0},
                                   train={"max_steps": 2, "batch_size": 8})))
    rows = _train_rows(out)
    assert len(rows) == 2 and all(r["truncated"] == 1.0 for r in rows)
    err = capfd.readouterr().err
    assert "re-tokenised" not in err
    assert err.count("ran out of rl.max_new_tokens") == 1 and "ppo.missing_eot_penalty (default 0" in err
    capfd.readouterr()
    train(load_config(config("ppo", name="penalised", method="lora", rl={"rewards": rewards, "eval_prompts": 0},
                             train={"max_steps": 1, "batch_size": 8}, ppo={"missing_eot_penalty": 1.0})))
    assert "ran out of rl.max_new_tokens" not in capfd.readouterr().err

"""PPO: GAE, whitening, the clipped policy and value losses, the KL controller and reward shaping against
hand-computed values; the EMA reference; PPO runs on the toy of test_rl_runs (a tiny random llama, reward = the
share of even token ids) — it raises the reward, and a run killed mid-round resumes onto the same curve."""

import json
import math

import pytest
import torch

from tunelab.objectives import load_run_config
from tunelab.errors import TunelabError
from tunelab.objectives.ppo import AdaptiveKL, clipped_value_loss
from tunelab.objectives.grpo import clipped_pg
from tunelab.rl.advantages import gae, whiten
from tunelab.rl.ppo_round import explained_variance, sequence_scores, token_rewards
from tunelab.train.launch import train

from tests.rl.test_rl_runs import EVEN, _results, _rows, _timing, _train_rows, config, toy  # noqa: F401


# ------------------------------------------------------------------------------------------------ pure parts
def test_gae_by_hand():
    # one row: a prompt token (masked out), three completion tokens, one pad
    r = torch.tensor([[9.0, 0.1, -0.2, 1.0, 7.0]])
    v = torch.tensor([[5.0, 0.5, 0.4, 0.3, 4.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    g, lam = 0.9, 0.8
    # backwards: δ3 = 1.0 − 0.3 (terminal); δ2 = −0.2 + 0.9·0.3 − 0.4; δ1 = 0.1 + 0.9·0.4 − 0.5
    d3, d2, d1 = 1.0 - 0.3, -0.2 + 0.9 * 0.3 - 0.4, 0.1 + 0.9 * 0.4 - 0.5
    a3 = d3
    a2 = d2 + g * lam * a3
    a1 = d1 + g * lam * a2
    adv, ret = gae(r, v, mask, gamma=g, lam=lam)
    assert adv[0].tolist() == pytest.approx([0.0, a1, a2, a3, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0.0], abs=1e-6)
    # γ = λ = 1: A_t = Σ_{k≥t} r_k − V_t (Monte-Carlo return minus the baseline)
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    assert adv[0, 1:4].tolist() == pytest.approx([0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3], abs=1e-6)
    assert ret[0, 1:4].tolist() == pytest.approx([0.9, 0.8, 1.0], abs=1e-6)


def test_gae_rows_end_at_their_own_last_token():
    r = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    v = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv, _ = gae(r, v, mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]]


def test_whitening_over_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    w = whiten(x, mask)
    mu, var = 2.5, ((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3  # unbiased over 1, 2, 3, 4
    assert w[mask].tolist() == pytest.approx([(v - mu) / math.sqrt(var + 1e-8) for v in (1, 2, 3, 4)], rel=1e-6)


def test_clipped_policy_loss_per_token_formula():
    logp = torch.log(torch.tensor([[1.5, 0.7, 1.1, 0.5]]))
    old = torch.zeros(1, 4)
    A = torch.tensor([[1.0, -1.0, -2.0, 2.0]])
    pg, ratio, clipped = clipped_pg(logp, old, A, 0.2)
    # −min(ρA, clip(ρ)A): ρ=1.5,A=1 → −1.2 (clipped); ρ=.7,A=−1 → −min(−.7,−.8)=.8 (clipped);
    # ρ=1.1,A=−2 → −min(−2.2,−2.2)=2.2; ρ=.5,A=2 → −min(1,1.6)=−1
    assert pg[0].tolist() == pytest.approx([-1.2, 0.8, 2.2, -1.0], rel=1e-6)
    assert clipped[0].tolist() == [True, True, False, False]


def test_clipped_value_loss_formula():
    v = torch.tensor([1.0, 0.0, 0.5, 2.0])
    old = torch.tensor([0.5, 0.5, 0.5, 0.0])
    R = torch.tensor([0.0, 1.0, 0.9, 3.0])
    vf, clipped = clipped_value_loss(v, old, R, 0.2)
    # clip(v, old ± .2): .7, .3, .5, .2  → ½·max((v−R)², (vc−R)²)
    want = [0.5 * max(1.0, 0.49), 0.5 * max(1.0, 0.49), 0.5 * max(0.16, 0.16), 0.5 * max(1.0, 7.84)]
    assert vf.tolist() == pytest.approx(want, rel=1e-6)
    assert clipped.tolist() == [False, False, False, True]
    vf, clipped = clipped_value_loss(v, old, R, None)
    assert vf.tolist() == pytest.approx([0.5, 0.5, 0.08, 0.5], rel=1e-6) and not clipped.any()


def test_adaptive_kl_controller():
    c = AdaptiveKL(0.1, target=6.0, horizon=100, adaptive=True)
    assert c.update(kl=9.0, n=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error 0.5, clipped to 0.2
    b = c.value
    assert c.update(kl=5.4, n=10) == pytest.approx(b * (1 - 0.1 * 10 / 100))  # error −0.1
    fixed = AdaptiveKL(0.1, adaptive=False)
    assert fixed.update(100.0, 64) == 0.1


def test_reward_shaping():
    s = sequence_scores(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([False, True, False]), missing_eot_penalty=1.0)
    assert s.tolist() == [1.0, -1.0, 3.0]
    n = sequence_scores(torch.tensor([1.0, -1.0, 3.0]), torch.zeros(3, dtype=torch.bool), normalize=True, clip=0.5)
    assert n.tolist() == pytest.approx([0.0, -0.5, 0.5], abs=1e-6)  # mean 1, std 2 → 0, −1, 1, then clipped
    kl = torch.tensor([[9.0, 0.5, 0.25, 0.0], [9.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    r = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.1)
    assert r.flatten().tolist() == pytest.approx([0.0, -0.05, 2.0 - 0.025, 0.0, 0.0, -1.0 - 0.1, 0.0, 0.0], abs=1e-6)
    assert explained_variance(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), torch.ones(2)) == 1.0


def test_ema_reference_moves_by_eta_each_step(tiny):
    from tunelab.objectives.reference import Reference

    model = tiny("llama")
    ref = Reference(model, "copy", sync_every=1, sync_alpha=0.25)
    name, p = next(iter(model.named_parameters()))
    start = dict(ref.model.named_parameters())[name].detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    assert ref.on_step(1)
    moved = dict(ref.model.named_parameters())[name]
    assert torch.allclose(moved, start + 0.25 * (p.detach() - start), atol=1e-6)  # θ_ref ← ηθ + (1−η)θ_ref


def test_value_model_has_its_own_adapter(tiny):
    from tunelab.adapters.base import adapter_parameters, apply_method
    from tunelab.config import RunConfig, method_options
    from tunelab.objectives.ppo import PPO as PPOObjective
    from tunelab.objectives.value import token_values

    model = tiny("llama")
    cfg = RunConfig.model_validate({"objective": "ppo", "method": "lora"})
    apply_method(model, "lora", method_options(cfg))
    PPOObjective.prepare_model(model, cfg)
    vm = model.ppo_value
    policy = adapter_parameters(model)
    assert vm.mode == "adapter" and len(vm.adapter) == len(policy) > 0
    torch.nn.init.normal_(vm.head.weight)  # zero at the start (V = 0); nonzero so gradients reach the body
    for p in vm.adapter.values():  # LoRA B = 0 at the start: move the value adapter off the policy's
        torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 1000, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "loss_mask": torch.tensor([[0, 0, 0, 0, 1, 1, 1]] * 2, dtype=torch.bool)}
    v = token_values(model, batch)
    # V(x, y_<t) sits at target t and is the head on the hidden state at t − 1; 0 off the loss mask
    h = vm.hidden(model, batch)
    assert torch.allclose(v[:, 4:], vm.head(h[:, 3:6].float()).squeeze(-1), atol=1e-5)
    assert (v[:, :4] == 0).all()
    with torch.no_grad():  # the value adapter differs from the policy's, so the value body is not the policy
        assert not torch.allclose(h, model.model(input_ids=ids).last_hidden_state, atol=1e-4)
    v.sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in policy.values())  # no value gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vm.adapter.values())


# ------------------------------------------------------------------------------------------------ runs
PPO = {"rl": {"ppo_epochs": 2}, "train": {"batch_size": 4, "grad_accum": 2}}  # a round = 2 steps of 2 minibatches


def test_ppo_raises_the_reward(config):
    out = train(load_run_config(config("ppo", method="lora", train={"max_steps": 16, "batch_size": 8, "lr": 3e-3})))
    res = _results(out)
    assert res["steps"] == 16 and math.isfinite(res["final_train_loss"])
    assert res["reward_after"] > res["reward_before"] + 0.1, (res["reward_before"], res["reward_after"])
    rows = _train_rows(out)
    for r in rows:
        for key in ("reward", "score", "entropy", "clip_fraction", "value_clip_fraction", "value_loss", "approx_kl",
                    "explained_variance", "completion_length", "advantage_abs"):
            assert math.isfinite(r[key]), (key, r)
        assert "kl" in r and r["kl"] == 0.0  # rl.beta = 0: no reference, no KL penalty
    # the first minibatch of each round is on-policy: its ratio is 1 before the first update
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-4) and rows[0]["approx_kl"] == pytest.approx(0, abs=1e-6)
    late, early = sum(r["reward"] for r in rows[-4:]) / 4, sum(r["reward"] for r in rows[:4]) / 4
    assert late > early, (early, late)
    assert (out / "value_model.safetensors").exists()
    from safetensors import safe_open

    for f in (out / "adapter").glob("*.safetensors"):  # the adapter folder stays the policy's alone
        with safe_open(str(f), "pt") as st:
            assert not any("ppo_value" in k for k in st.keys())


def test_ppo_killed_mid_round_resumes_exactly_with_ema_reference_and_adaptive_kl(config):
    kw = dict(PPO, method="lora", reference={"sync_every": 1, "sync_alpha": 0.1},
              rl={"ppo_epochs": 2}, ppo={"beta": 0.05, "adaptive_kl": True, "kl_target": 0.5, "kl_horizon": 20})
    kw["train"] = {**PPO["train"], "max_steps": 4, "save_every": 1}
    whole = train(load_run_config(config("ppo", name="whole", **kw)))
    cfg = load_run_config(config("ppo", name="killed", **kw))
    train(cfg, stop_after=3)  # the checkpoint at step 3 is in the middle of round 1
    state = json.loads((cfg_out := (whole.parent / "killed")).joinpath("checkpoints", "step-000003", "state.json")
                       .read_text())["loop"]
    assert state["source"]["round"] == 1
    train(cfg)
    a, b = _rows(whole), _rows(cfg_out)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in (k for k in ra if not _timing(k)):
            assert rb[k] == pytest.approx(ra[k], abs=1e-6, rel=0), (ra["step"], k)
    kls = [r["kl_coef"] for r in _train_rows(whole)]
    assert kls[0] == 0.05 and kls[2] != 0.05  # the controller moved β after round 0
    assert any(r["kl"] > 0 for r in _train_rows(whole))  # the EMA reference drifts from the policy


def test_ppo_early_stop_on_approx_kl(config):
    out = train(load_run_config(config("ppo", method="lora", train={"max_steps": 2, "batch_size": 2, "lr": 5e-2},
                                   rl={"ppo_epochs": 4}, ppo={"target_kl": 1e-6})))
    rows = _train_rows(out)
    assert any(r["early_stopped"] > 0 for r in rows)


def test_ppo_config_errors(config):
    with pytest.raises(TunelabError, match="adaptive_kl needs ppo.beta"):
        train(load_run_config(config("ppo", ppo={"adaptive_kl": True})))
    with pytest.raises(TunelabError, match="ppo.advantage: unknown key"):  # ppo's advantages are GAE's
        train(load_run_config(config("ppo", ppo={"advantage": "rloo"})))


def _reward_run(tmp_path, tiny, tokenizer, method: str):
    """A finished reward-model run folder as `objective: reward` leaves it: base in `base/`, the trained adapter
    in `adapter/` (or the whole model in `model/` for full finetuning), the head, config.yaml."""
    import yaml

    from tunelab.adapters.base import adapter_parameters, apply_method, export_method
    from tunelab.config import RunConfig, method_options
    from tunelab.objectives.reward import add_reward_head, save_reward_head

    run, base = tmp_path / f"rm_{method}", tmp_path / "base"
    model = tiny("llama")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = RunConfig.model_validate({"objective": "reward", "method": method, "model": {"name": str(base)}})
    if method == "lora":
        apply_method(model, "lora", method_options(cfg))
        with torch.no_grad():
            for p in adapter_parameters(model).values():
                p.normal_(std=0.05)
        export_method(model, "lora", method_options(cfg), run / "adapter", base_model_name_or_path=str(base))
        tokenizer.save_pretrained(run / "adapter")
    else:
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.add_(0.5)
        model.save_pretrained(run / "model")
        tokenizer.save_pretrained(run / "model")
    add_reward_head(model)
    with torch.no_grad():
        model.reward_head.weight.normal_()
    save_reward_head(model, run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return run


@pytest.mark.parametrize("mode", ["adapter", "copy"])
def test_value_model_starts_as_the_reward_model(tiny, tokenizer, tmp_path, mode):
    """InstructGPT's initialisation: V's head and body are the reward model's, so V(x, y) at the last token is
    the reward model's score of (x, y) before any PPO step."""
    from tunelab.adapters.base import apply_method
    from tunelab.config import method_options
    from tunelab.objectives import run_config_schema
    from tunelab.objectives.ppo import PPO as PPOObjective
    from tunelab.objectives.reward import load_reward_model, rewards
    from tunelab.objectives.value import token_values

    rm_method = "lora" if mode == "adapter" else "full"
    run = _reward_run(tmp_path, tiny, tokenizer, rm_method)
    model = tiny("llama")  # the same seed: the same base weights as the reward run's base
    cfg = run_config_schema().model_validate({"objective": "ppo", "method": "lora",
                                              "ppo": {"value_model": mode, "value_init": str(run)}})
    apply_method(model, "lora", method_options(cfg))
    PPOObjective.prepare_model(model, cfg)
    assert model.ppo_value.mode == mode
    ids = torch.randint(0, 1000, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "loss_mask": torch.tensor([[0, 0, 0, 0, 1, 1, 1]] * 2, dtype=torch.bool)}
    rm = load_reward_model(run, "cpu").model
    with torch.no_grad():
        want = rewards(rm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})  # score at the last token
        v = token_values(model, {**batch, "input_ids": torch.cat([ids, ids[:, :1]], 1),
                                 "attention_mask": torch.ones(2, 8, dtype=torch.long),
                                 "loss_mask": torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]] * 2, dtype=torch.bool)})
    assert torch.allclose(v[:, -1], want.float(), atol=1e-4), (v[:, -1], want)  # V at t=7 is the head on h_6
    assert want.abs().min() > 1e-3  # a real score, not the zero-initialised head


def test_value_init_refuses_an_adapter_over_other_base_weights(tiny, tokenizer, tmp_path):
    from tunelab.adapters.base import apply_method
    from tunelab.config import method_options
    from tunelab.objectives import run_config_schema
    from tunelab.objectives.ppo import PPO as PPOObjective

    run = _reward_run(tmp_path, tiny, tokenizer, "lora")
    model = tiny("llama", seed=1)  # other base weights
    cfg = run_config_schema().model_validate({"objective": "ppo", "method": "lora",
                                              "ppo": {"value_model": "adapter", "value_init": str(run)}})
    apply_method(model, "lora", method_options(cfg))
    with pytest.raises(TunelabError, match="different base weights") as e:
        PPOObjective.prepare_model(model, cfg)
    assert "\n" not in str(e.value)
    run_full = _reward_run(tmp_path, tiny, tokenizer, "full")
    cfg = run_config_schema().model_validate({"objective": "ppo", "method": "lora",
                                              "ppo": {"value_model": "adapter", "value_init": str(run_full)}})
    with pytest.raises(TunelabError, match="full-finetuning reward model"):
        _prep(tiny, cfg)


def _prep(tiny, cfg):
    from tunelab.adapters.base import apply_method
    from tunelab.config import method_options
    from tunelab.objectives.ppo import PPO as PPOObjective

    model = tiny("llama")
    apply_method(model, "lora", method_options(cfg))
    PPOObjective.prepare_model(model, cfg)


def test_ppo_owns_its_kl_controller_and_updates_it_once_per_round():
    """The rows of a round carry its KL over every rank (rl/rows/ppo.py); PPO updates β from them at the round's
    first micro-batch, never twice for one round (a round is served in several micro-batches and passes)."""
    from tunelab.objectives.ppo import PPO

    ppo = PPO(kl=AdaptiveKL(0.1, target=1.0, horizon=10, adaptive=True))
    batch = {"round": torch.tensor([0, 0]), "round_kl": torch.tensor([2.0, 2.0]),
             "round_sequences": torch.tensor([4.0, 4.0])}
    ppo.before_round(batch)
    ppo.before_round(batch)  # the round's next micro-batch
    assert ppo.kl.value == pytest.approx(0.1 * (1 + 0.2 * 4 / 10))
    ppo.before_round({**batch, "round": torch.tensor([1, 1])})
    assert ppo.kl.value == pytest.approx(0.1 * 1.08 ** 2)
    restored = PPO(kl=AdaptiveKL(0.1, target=1.0, horizon=10, adaptive=True))
    restored.load_state_dict(ppo.state_dict())
    restored.before_round({**batch, "round": torch.tensor([1, 1])})  # resumed inside round 1: already counted
    assert restored.kl.value == pytest.approx(ppo.kl.value)


def test_a_reward_model_loads_with_its_runs_template(tiny, tokenizer, tmp_path):
    """The reward model is loaded by the one run loader (`saved_run.load_run`), so it scores prompts rendered
    with the template the reward run trained with (was: the tokenizer's own, ignoring tunelab_template.json)."""
    from tunelab.data.templates import get_template
    from tunelab.export import load_run
    from tunelab.objectives.reward import load_reward_model

    run = _reward_run(tmp_path, tiny, tokenizer, "lora")
    llama3 = get_template("llama3", tokenizer)
    (run / "adapter" / "tunelab_template.json").write_text(json.dumps({"name": "llama3", "jinja": llama3.jinja}))
    rm = load_reward_model(run, "cpu")
    assert rm.template.name == "llama3" and rm.template.jinja == llama3.jinja
    _, _, template = load_run(run, device="cpu")
    assert template.name == "llama3"  # the same loader

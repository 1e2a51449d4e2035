"""Pure parts of the issue-24 options: REINFORCE++ advantages, DAPO dynamic sampling's group filter, the reference
built from the policy alone (no value model), the factor-space EMA bound for LoRA, the objective default of the
EMA rate, the loop skipping an optimizer step with no loss unit, and PPO's critic warm-up."""

import math
from contextlib import nullcontext

import pytest
import torch

from tunelab.rl.advantages import compute, reinforce_pp, reinforce_pp_baseline, whiten
from tunelab.rl.dynamic_sampling import choose_groups, concat_samples, informative_groups, select_groups
from tunelab.sampling import Samples


# ------------------------------------------------------------------------------------------------ REINFORCE++
def test_reinforce_pp_normalises_over_the_whole_batch():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 1.0, 3.0])
    mu = 10 / 8
    sd = math.sqrt(sum((x - mu) ** 2 for x in r.tolist()) / 7)
    assert reinforce_pp(r, group_size=4).tolist() == pytest.approx([(x - mu) / math.sqrt(sd * sd + 1e-8) for x in r.tolist()],
                                                                    rel=1e-5)
    # baseline variant: group means 0.5 and 2 first → d = ±0.5, ±1; then the batch normalisation
    d = [0.5, -0.5, -0.5, 0.5, 1.0, -1.0, -1.0, 1.0]
    sd_d = math.sqrt(sum(x * x for x in d) / 7)  # mean of d is 0
    assert reinforce_pp_baseline(r, group_size=4).tolist() == pytest.approx([x / math.sqrt(sd_d * sd_d + 1e-8) for x in d], rel=1e-5)
    assert compute("reinforce_pp", r, group_size=4).tolist() == reinforce_pp(r, group_size=4).tolist()
    # unlike grpo, a group whose rewards are all equal keeps a nonzero advantage (its distance to the batch mean)
    tied = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert reinforce_pp(tied, group_size=2)[:2].abs().min() > 0.1


def test_reinforce_pp_whitens_over_tokens_as_verl():
    """verl whitens the token-level returns (every token of completion i has return r_i): completion i weighs its
    n_i tokens. Hand-computed: r = (1, 0), n = (3, 1) → μ = 3/4, σ² = (3·(1/4)² + (3/4)²) / 3 = 1/4."""
    r, n = torch.tensor([1.0, 0.0]), torch.tensor([3, 1])
    assert reinforce_pp(r, group_size=2, token_counts=n).tolist() == pytest.approx(
        [0.25 / math.sqrt(0.25 + 1e-8), -0.75 / math.sqrt(0.25 + 1e-8)], rel=1e-6)
    # ≡ `whiten` (verl's masked_whiten) of the [B, T] returns broadcast over each completion's tokens
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 1.0])
    counts = torch.tensor([5, 1, 3, 7, 2, 4])
    mask = torch.arange(7)[None, :] < counts[:, None]
    baseline = compute("dr_grpo", rewards, group_size=3)
    for estimator, returns in ((reinforce_pp, rewards), (reinforce_pp_baseline, baseline)):
        token_level = whiten(returns[:, None].expand(-1, 7).contiguous(), mask)
        torch.testing.assert_close(estimator(rewards, group_size=3, token_counts=counts), token_level[:, 0],
                                   rtol=1e-5, atol=1e-6)
    # the length weighting matters: a long wrong answer pulls the mean down more than a short one
    assert not torch.allclose(reinforce_pp(rewards, group_size=3, token_counts=counts), reinforce_pp(rewards, group_size=3))


# ------------------------------------------------------------------------------------------- dynamic sampling
def test_informative_groups_and_the_choice():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 2.0, 2.0, 0.5, 0.0])
    inf = informative_groups(r, 2)
    assert inf.tolist() == [False, True, False, False, True]
    assert choose_groups(inf, 2) == [1, 4]
    assert choose_groups(inf, 4) == [0, 1, 2, 4]  # the cap left it short: the earliest uninformative fill in
    assert choose_groups(torch.tensor([True, True, True]), 2) == [0, 1]


def _samples(prompt_len, comp_len, n_prompts, G, start):
    B = n_prompts * G
    pids = torch.arange(B * prompt_len).reshape(B, prompt_len) + start
    cids = torch.arange(B * comp_len).reshape(B, comp_len) + 1000 + start
    return Samples(pids, torch.ones_like(pids), cids, torch.ones_like(cids), -torch.rand(B, comp_len),
                   tuple("stop" for _ in range(B)), torch.arange(n_prompts).repeat_interleave(G))


def test_concat_and_select_keep_rows_aligned():
    a, b = _samples(3, 2, 2, 2, 0), _samples(5, 4, 1, 2, 500)
    c = concat_samples(a, b, pad_id=-1)
    assert c.prompt_ids.shape == (6, 5) and c.completion_ids.shape == (6, 4)
    assert c.prompt_ids[0].tolist() == [-1, -1, *a.prompt_ids[0].tolist()]  # prompts re-left-padded
    assert c.prompt_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert c.completion_ids[0].tolist() == [*a.completion_ids[0].tolist(), -1, -1]  # completions right-padded
    assert c.completion_mask[0].tolist() == [1, 1, 0, 0] and c.logprobs[0, 2:].tolist() == [0.0, 0.0]
    assert c.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    s = select_groups(c, [0, 2], 2)
    assert torch.equal(s.completion_ids[2:], b.completion_ids) and torch.equal(s.prompt_ids[:2, 2:], a.prompt_ids[:2])
    assert s.prompt_index.tolist() == [0, 0, 1, 1] and len(s.finish_reason) == 4


# ------------------------------------------------------------------------------------------------ reference
def test_reference_copy_holds_the_policy_alone(tiny):
    """Defect 4: the value model hangs on the policy before the reference is built; the copy must not take it."""
    from tunelab.config import RunConfig
    from tunelab.objectives.ppo import PPO
    from tunelab.objectives.reference import Reference

    model = tiny("llama")
    policy_params = sum(p.numel() for p in model.parameters())
    PPO.prepare_model(model, RunConfig.model_validate({"objective": "ppo", "method": "full"}))
    value_params = sum(p.numel() for p in model.ppo_value.parameters())
    assert value_params > 0.5 * policy_params  # full finetuning: the value model is a copy of the body
    ref = Reference(model, "copy", sync_every=1, sync_alpha=0.5)
    assert not hasattr(ref.model, "ppo_value") and hasattr(model, "ppo_value")  # the policy keeps its value model
    assert sum(p.numel() for p in ref.model.parameters()) == policy_params
    assert not any("ppo_value" in k for k in ref.state_dict())
    head = model.ppo_value.head.weight
    before = head.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ref.on_step(1)  # the EMA moves the reference's weights, and touches nothing of the value model
    assert torch.equal(head.detach(), before + 1.0)


def test_factor_ema_gap_identity_and_bound(tiny):
    """Defect 6: averaging LoRA's A and B separately is not averaging B·A; the gap is the factors' weighted
    covariance, bounded as documented (objectives/reference.py). The weights are those the reference applies."""
    from tunelab.adapters.base import adapter_modules, adapter_parameters, apply_method
    from tunelab.config import RunConfig, method_options
    from tunelab.objectives.reference import Reference, factor_ema_gap

    model = tiny("llama")
    cfg = RunConfig.model_validate({"method": "lora", "lora": {"r": 2}})
    apply_method(model, "lora", method_options(cfg))
    name = next(n for n, _ in adapter_modules(model))
    keys = sorted(k for k in adapter_parameters(model) if k.startswith(name + "."))
    a_key, b_key = [k for k in keys if "lora_A" in k or k.endswith(".A")][0], \
        [k for k in keys if "lora_B" in k or k.endswith(".B")][0]
    alpha, g = 0.3, torch.Generator().manual_seed(0)
    ref = Reference(model, "adapter", sync_every=1, sync_alpha=alpha)
    params = adapter_parameters(model)
    traj = [(params[b_key].detach().clone().double(), params[a_key].detach().clone().double())]
    for step in range(1, 6):
        with torch.no_grad():
            for p in params.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        ref.on_step(step)
        traj.append((params[b_key].detach().clone().double(), params[a_key].detach().clone().double()))
    n = len(traj) - 1
    w = [(1 - alpha) ** n] + [alpha * (1 - alpha) ** (n - k) for k in range(1, n + 1)]
    B_bar = sum(wk * B for wk, (B, _) in zip(w, traj))
    A_bar = sum(wk * A for wk, (_, A) in zip(w, traj))
    torch.testing.assert_close(ref._ref_adapter[b_key].double(), B_bar, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ref._ref_adapter[a_key].double(), A_bar, atol=1e-6, rtol=1e-5)
    gap, bound = factor_ema_gap(traj, alpha)
    cov = sum(wk * (B - B_bar) @ (A - A_bar) for wk, (B, A) in zip(w, traj))
    assert gap == pytest.approx(float(torch.linalg.norm(cov)), rel=1e-9)
    assert 0 < gap <= bound + 1e-12


def test_ema_rate_defaults_per_objective():
    from tunelab.config import RunConfig
    from tunelab.objectives.reference import default_sync_alpha

    for objective in ("grpo", "rloo", "ppo"):
        assert default_sync_alpha(RunConfig(objective=objective)) == 0.001  # ReaLHF's EMA rate
    for objective in ("dpo", "kto", "online_dpo"):
        assert default_sync_alpha(RunConfig(objective=objective)) == 0.6  # TR-DPO's soft update
    assert default_sync_alpha(RunConfig(objective="ppo", reference={"sync_alpha": 0.05})) == 0.05


# ------------------------------------------------------------------------------------------------- the loop
class _ZeroAfter:
    """SFT's loss on the first `real` micro-batches, then a loss over zero units (as PPO's approx-KL stop)."""

    def __init__(self, real):
        from tunelab.objectives.sft import SFT

        self.sft, self.real, self.calls = SFT(), real, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.calls <= self.real:
            return self.sft.loss(model, batch)
        p = next(model.parameters())
        return (p.sum() * 0.0).float(), torch.zeros((), dtype=torch.long), {"early_stopped": 1.0}


def test_a_step_without_loss_units_leaves_the_weights_alone(tiny, tmp_path):
    """Defect 5: with AdamW, weight decay and momentum, a 'skipped' step used to move the weights."""
    from tests.train.test_loop import _examples
    from tunelab.config import TrainConfig
    from tunelab.data.batches import StaticBatches
    from tunelab.data.collate import collate
    from tunelab.train.loop import fit

    batches = [collate(_examples(8)[k:k + 2], pad_id=0) for k in range(0, 8, 2)]
    weights = {}
    for steps in (1, 3):
        model = tiny("llama")
        cfg = TrainConfig(max_steps=steps, batch_size=2, optimizer="AdamW", lr=1e-2, weight_decay=0.1,
                          warmup_steps=0, scheduler="constant")
        fit(model, _ZeroAfter(1), StaticBatches(lambda e: batches, len(batches)), cfg, tmp_path / f"s{steps}")
        weights[steps] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in tiny("llama").parameters()])
    assert (weights[1] - start).abs().max() > 1e-4  # the real step moved them
    assert torch.equal(weights[3], weights[1])  # the two empty steps did not


# ---------------------------------------------------------------------------------------------- critic warm-up
def test_critic_warmup_trains_the_value_model_only(tiny):
    from tunelab.config import RunConfig
    from tunelab.objectives.ppo import PPO

    model = tiny("llama")
    PPO.prepare_model(model, RunConfig.model_validate({"objective": "ppo", "method": "full"}))
    torch.nn.init.normal_(model.ppo_value.head.weight)
    ids = torch.randint(5, 900, (2, 7))
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1]] * 2, dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask,
             "old_logprobs": torch.full((2, 7), -5.0) * mask, "advantages": torch.randn(2, 7) * mask,
             "old_values": torch.zeros(2, 7), "returns": torch.ones(2, 7) * mask}
    value_ids = {id(p) for p in model.ppo_value.parameters()}
    policy = [p for p in model.parameters() if id(p) not in value_ids]
    for round_, frozen in ((0, True), (1, False)):
        model.zero_grad(set_to_none=True)
        obj = PPO(value_warmup_rounds=1)
        loss_sum, n, m = obj.loss(model, {**batch, "round": torch.full((2,), round_)})
        loss_sum.backward()
        assert m["value_warmup"] == float(frozen)
        assert all(p.grad is None for p in policy) == frozen  # no gradient at all: AdamW leaves them exactly
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.ppo_value.parameters())


def test_dynamic_sampling_loop_keeps_the_informative_groups_in_order():
    """RolloutSource._dynamic_sampling with a scripted sampler: pass 0 has no informative group, extra pass 1 one,
    extra pass 2 one more → the round is those two, with their prompts, texts and rewards aligned."""
    from types import SimpleNamespace

    from tunelab.config import RunConfig
    from tunelab.rl.rollout import RolloutSource

    G, P = 2, 2
    script = {1: [0.0, 1.0, 5.0, 5.0], 2: [7.0, 7.0, 2.0, 3.0]}  # rewards of the extra passes

    def complete(prompts, params):
        k = 1 if 1 not in calls else 2
        calls.append(k)
        s = _samples(2, 3, P, G, 100 * k)
        return s, [f"pass{k}-row{i}" for i in range(P * G)], SimpleNamespace(total=script[k])

    calls = []
    from tunelab.rl.sampler import SamplingParams

    fake = SimpleNamespace(cfg=RunConfig.model_validate({"objective": "grpo"}), prompts=[f"p{i}" for i in range(10)],
        G=G, P=P, params=SamplingParams(n=G), metrics={},
        ctx=SimpleNamespace(rank=0, model=None, gathered=lambda: nullcontext(),
                            tokenizer=SimpleNamespace(pad_token_id=-1),
                            objective=SimpleNamespace(dynamic_sampling=True, dynamic_sampling_max_rounds=3)),
        _complete=complete)
    first = _samples(2, 3, P, G, 0)
    prompts, samples, texts, rewards = RolloutSource._dynamic_sampling(
        fake, 0, ["a", "b"], first, [f"pass0-row{i}" for i in range(4)], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert calls == [1, 2]  # stopped as soon as P groups were informative
    assert texts == ["pass1-row0", "pass1-row1", "pass2-row2", "pass2-row3"]
    assert rewards.tolist() == [0.0, 1.0, 2.0, 3.0] and len(prompts) == 2
    assert samples.prompt_index.tolist() == [0, 0, 1, 1]
    assert torch.equal(samples.completion_ids[2:], _samples(2, 3, P, G, 200).completion_ids[2:])
    assert fake.metrics == {"dynamic_sampling_informative": 0.0, "dynamic_sampling_extra_passes": 2,
                            "dynamic_sampling_filled": 0}


def test_ppo_entropy_bonus_by_hand(tiny):
    """PPO's ℓ_t gains −c_H·H_t on every completion token: Σ-loss(c) − Σ-loss(0) = −c · Σ_t H_t."""
    from tunelab.config import RunConfig
    from tunelab.objectives.ppo import PPO

    model = tiny("llama")
    PPO.prepare_model(model, RunConfig.model_validate({"objective": "ppo", "method": "full"}))
    ids = torch.randint(5, 900, (2, 7))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask,
             "old_logprobs": torch.full((2, 7), -5.0) * mask, "advantages": torch.randn(2, 7) * mask,
             "old_values": torch.zeros(2, 7), "returns": torch.ones(2, 7) * mask, "round": torch.zeros(2)}
    base, n, m = PPO().loss(model, batch)
    bonus, n2, _ = PPO(entropy_coef=0.1).loss(model, batch)
    tokens = int(n)
    assert tokens == 7 == int(n2)  # 4 + 3 completion tokens
    assert (bonus - base).item() == pytest.approx(-0.1 * m["entropy"] * tokens, rel=1e-5)

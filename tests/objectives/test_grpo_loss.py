"""GRPO / RLOO clipped policy-gradient loss (objectives/grpo.py): by hand from a tiny model's full logits, each
aggregation, the clip, the KL estimators, the gradient's direction, and TRL 1.16's `GRPOTrainer._compute_loss`
on identical inputs (its own fused log-prob head on a copy of the model, a stand-in `self`)."""

import copy
import math
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunelab.errors import TunelabError
from tunelab.models.tiny import tiny_model
from tunelab.objectives.grpo import GRPO, RLOO, aggregate, token_kl

PAD = 2
# (prompt, completion): prompts of different lengths (left-padded in the batch), completions right-padded
ROWS = [([1, 17, 33, 5, 9], [40, 41, 42, PAD]), ([1, 8, 3], [60, 61])]
ADV = [1.5, -0.8]
# old log-prob = hand log-prob + δ, so ρ = exp(−δ): row 0 (A > 0) token 1 above 1 + ε → clipped, token 2 below
# 1 − ε but A > 0 → not clipped; row 1 (A < 0) token 0 below 1 − ε → clipped
OLD_DELTA = [[0.0, -0.5, 0.3, 0.1], [0.5, -0.1]]
REF_DELTA = [[0.2, -0.3, 0.05, 0.4], [-0.25, 0.15]]
MAXLEN = 8


@pytest.fixture
def model():
    return tiny_model("llama", seed=0, vocab_size=128).eval()


def hand_logps(model, rows=ROWS, temperature=1.0):
    """log softmax(logits / T) of each completion token, each row alone and unpadded, in float64."""
    out = []
    for p, c in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0].double() / temperature
        lp = F.log_softmax(logits, -1)
        out.append([lp[len(p) + k - 1, tok].item() for k, tok in enumerate(c)])
    return out


def make(rows=ROWS, adv=ADV, old=None, ref=None):
    """(tunelab batch, TRL inputs) for the same rows; old/ref: per-token lists like hand_logps (or None)."""
    B, P, C = len(rows), max(len(p) for p, _ in rows), max(len(c) for _, c in rows)
    pid, pm = torch.full((B, P), PAD), torch.zeros((B, P), dtype=torch.long)
    cid, cm = torch.full((B, C), PAD), torch.zeros((B, C), dtype=torch.long)
    o, r = torch.zeros(B, C), torch.zeros(B, C)
    for i, (p, c) in enumerate(rows):
        pid[i, P - len(p):], pm[i, P - len(p):] = torch.tensor(p), 1
        cid[i, :len(c)], cm[i, :len(c)] = torch.tensor(c), 1
        if old is not None:
            o[i, :len(c)] = torch.tensor(old[i])
        if ref is not None:
            r[i, :len(c)] = torch.tensor(ref[i])
    batch = {"input_ids": torch.cat([pid, cid], 1), "attention_mask": torch.cat([pm, cm], 1),
             "loss_mask": torch.cat([torch.zeros_like(pm), cm], 1).bool(), "advantages": torch.tensor(adv)}
    zeros = torch.zeros(B, P)
    if old is not None:
        batch["old_logprobs"] = torch.cat([zeros, o], 1)
    if ref is not None:
        batch["ref_logprobs"] = torch.cat([zeros, r], 1)
    trl = {"prompt_ids": pid, "prompt_mask": pm, "completion_ids": cid, "completion_mask": cm,
           "advantages": torch.tensor(adv), "old_per_token_logps": o, "ref_per_token_logps": r,
           "num_items_in_batch": cm.sum()}
    return batch, trl


def shifted(lps, deltas):
    return [[v + d for v, d in zip(row, ds)] for row, ds in zip(lps, deltas)]


def hand_tokens(lp, adv=ADV, beta=0.0, eps=0.2, eps_high=None, kl="k3"):
    """Per-token losses (lists per row) and clip flags, by hand from the deltas."""
    eps_high = eps if eps_high is None else eps_high
    losses, clips = [], []
    for i, row in enumerate(lp):
        A, lrow, crow = adv[i], [], []
        for k in range(len(row)):
            ratio = math.exp(-OLD_DELTA[i][k])
            pg = -min(ratio * A, min(max(ratio, 1 - eps), 1 + eps_high) * A)
            d = REF_DELTA[i][k]  # log π_ref − log π_θ
            lrow.append(pg + beta * ((math.exp(d) - d - 1) if kl == "k3" else -d))
            crow.append((ratio < 1 - eps and A < 0) or (ratio > 1 + eps_high and A > 0))
        losses.append(lrow)
        clips.append(crow)
    return losses, clips


def run(model, obj, **kw):
    lp = hand_logps(model, temperature=obj.temperature)
    batch, _ = make(old=shifted(lp, OLD_DELTA), ref=shifted(lp, REF_DELTA), **kw)
    return obj.loss(model, batch), lp


# ------------------------------------------------------------------------------------------------ by hand
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_ignore_left_padding_and_use_the_temperature(model, temperature):
    """With old = the hand log-probs, every ratio is 1: the objective scores exactly those numbers."""
    lp = hand_logps(model, temperature=temperature)
    batch, _ = make(old=lp)
    (loss_sum, n, m) = GRPO(temperature=temperature).loss(model, batch)
    assert m["ratio"] == pytest.approx(1.0, abs=1e-5) and m["clip_fraction"] == 0.0
    assert int(n) == 6 and m["completion_len"] == 3.0
    assert loss_sum.item() == pytest.approx(-(4 * ADV[0] + 2 * ADV[1]), abs=1e-4)


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean", "constant"])
@pytest.mark.parametrize("kl", ["k3", "k1"])
def test_loss_by_hand(model, agg, kl):
    obj = GRPO(beta=0.1, epsilon=0.2, epsilon_high=0.28, loss_agg=agg, kl_estimator=kl, max_completion_length=MAXLEN)
    (loss_sum, n, m), lp = run(model, obj)
    tokens, clips = hand_tokens(lp, beta=0.1, eps=0.2, eps_high=0.28, kl=kl)
    if agg == "token_mean":
        want_sum, want_n = sum(map(sum, tokens)), 6
    elif agg == "sequence_mean":
        want_sum, want_n = sum(sum(t) / len(t) for t in tokens), 2
    else:
        want_sum, want_n = sum(map(sum, tokens)) / MAXLEN, 2
    assert int(n) == want_n
    assert loss_sum.item() == pytest.approx(want_sum, abs=1e-5)
    kls = [(math.exp(d) - d - 1) if kl == "k3" else -d for row in REF_DELTA for d in row]
    assert m["kl"] == pytest.approx(sum(kls) / 6, abs=1e-5)
    assert m["clip_fraction"] == pytest.approx(sum(map(sum, clips)) / 6)
    ratios = [math.exp(-d) for row in OLD_DELTA for d in row]
    assert m["ratio"] == pytest.approx(sum(ratios) / 6, abs=1e-5)
    assert m["adv_mean"] == pytest.approx(sum(ADV) / 2) and m["adv_std"] == pytest.approx(torch.tensor(ADV).std().item())


def test_clip_active_and_inactive(model):
    lp = hand_logps(model)
    _, clips = hand_tokens(lp, eps=0.2)
    assert clips == [[False, True, False, False], [True, False]]  # the deltas do what the comments say
    m = run(model, GRPO(epsilon=0.2))[0][2]
    assert m["clip_fraction"] == pytest.approx(2 / 6)
    # a wide clip range: nothing clipped, the loss is the plain −ρ·A
    (ls, n, m), lp = run(model, GRPO(epsilon=0.9))
    assert m["clip_fraction"] == 0.0
    want = -sum(math.exp(-d) * ADV[i] for i, row in enumerate(OLD_DELTA) for d in row)
    assert ls.item() == pytest.approx(want, abs=1e-5)


def test_fully_clipped_tokens_have_no_gradient(model):
    lp = hand_logps(model)
    # every ratio far above 1 + ε with A > 0: clipped, constant loss, zero gradient
    batch, _ = make(adv=[1.0, 2.0], old=shifted(lp, [[-1.0] * 4, [-1.0] * 2]))
    loss_sum, n, m = GRPO().loss(model, batch)
    assert m["clip_fraction"] == 1.0 and loss_sum.item() == pytest.approx(-1.2 * (4 * 1.0 + 2 * 2.0), abs=1e-5)
    grads = torch.autograd.grad(loss_sum, [p for p in model.parameters()], allow_unused=True)
    assert all(g is None or g.abs().max().item() == 0.0 for g in grads)


def test_token_kl_formulas():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.2, -1.0, -0.5])
    d = ref - logp
    torch.testing.assert_close(token_kl(logp, ref, "k3"), torch.exp(d) - d - 1)
    torch.testing.assert_close(token_kl(logp, ref, "k1"), logp - ref)
    assert (token_kl(logp, ref, "k3") >= 0).all() and token_kl(logp, ref, "k3")[2].item() == 0.0
    # k3 is an unbiased estimate of KL(p‖q) under samples from p
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    assert (p * token_kl(p.log(), q.log(), "k3")).sum().item() == pytest.approx(exact.item(), rel=1e-5)
    with pytest.raises(TunelabError, match="unknown KL estimator"):
        token_kl(logp, ref, "k2")


def test_aggregations_of_a_known_tensor():
    per = torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, True], [False, True, False, False]])
    assert [x.item() for x in aggregate(per, mask, "token_mean")] == [10.0, 4]
    assert [x.item() for x in aggregate(per, mask, "sequence_mean")] == [2.0 + 4.0, 2]
    assert [x.item() for x in aggregate(per, mask, "constant", 5)] == [2.0, 2]


def test_token_mean_accumulates_exactly(model):
    """Σ loss_sum / Σ n over two micro-batches of one row each = the loss of the batch of both rows."""
    lp = hand_logps(model)
    obj = GRPO(beta=0.05)
    whole = obj.loss(model, make(old=shifted(lp, OLD_DELTA), ref=shifted(lp, REF_DELTA))[0])
    parts = [obj.loss(model, make([ROWS[i]], [ADV[i]], [shifted(lp, OLD_DELTA)[i]], [shifted(lp, REF_DELTA)[i]])[0])
             for i in range(2)]
    assert (whole[0] / whole[1]).item() == pytest.approx(
        (sum(p[0] for p in parts) / sum(p[1] for p in parts)).item(), abs=1e-6)


def test_without_old_logprobs_the_ratio_is_one(model):
    batch, _ = make()
    loss_sum, n, m = GRPO().loss(model, batch)
    assert m["ratio"] == 1.0 and loss_sum.item() == pytest.approx(-(4 * ADV[0] + 2 * ADV[1]), abs=1e-5)


# --------------------------------------------------------------------------------------------- reference
class Exploding:
    def token_logprobs(self, batch, temperature=1.0):
        raise AssertionError("the reference was called with beta = 0")


def test_beta_zero_never_touches_the_reference(model):
    batch, _ = make()
    assert "kl" not in GRPO(beta=0.0, reference=Exploding()).loss(model, batch)[2]


def test_reference_object_equals_precomputed_ref_logprobs(model):
    from tunelab.objectives.reference import Reference

    ref_model = tiny_model("llama", seed=1, vocab_size=128)
    lp_ref = hand_logps(ref_model, temperature=0.8)
    lp = hand_logps(model, temperature=0.8)
    reference = Reference(ref_model, mode="copy")
    batch, _ = make(old=lp)
    a = GRPO(beta=0.2, temperature=0.8, reference=reference).loss(model, batch)
    batch_pre, _ = make(old=lp, ref=lp_ref)
    b = GRPO(beta=0.2, temperature=0.8).loss(model, batch_pre)
    assert a[0].item() == pytest.approx(b[0].item(), abs=1e-5) and a[2]["kl"] == pytest.approx(b[2]["kl"], abs=1e-6)
    assert b[2]["kl"] > 0.01
    with pytest.raises(TunelabError, match="needs a reference model"):
        GRPO(beta=0.2).loss(model, make()[0])


# ---------------------------------------------------------------------------------------------- gradient
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_sgd_step_moves_the_completion_with_its_advantage(model, sign):
    batch, _ = make(adv=[sign, 0.0], old=hand_logps(model))
    before = sum(hand_logps(model)[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_sum, n, _ = GRPO(beta=0.0).loss(model, batch)
    (loss_sum / n).backward()
    opt.step()
    after, _ = hand_logps(model)
    assert (sum(after) - before) * sign > 1e-4


# ------------------------------------------------------------------------------------------------- TRL
class Acc:
    device = torch.device("cpu")
    num_processes, is_main_process = 1, True

    def autocast(self):
        return nullcontext()

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(model, inputs, loss_type, beta, eps, eps_high, temperature, **fake_attributes):
    """TRL's `_compute_loss` with its own fused log-prob head (on a copy of `model`) and a stand-in `self`;
    `fake_attributes` override the stand-in's (e.g. importance_sampling_level="sequence": GSPO)."""
    trl = pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    m = copy.deepcopy(model)
    add_fused_lm_head(m, temperature=temperature, outputs=("log_probs", "entropy"))
    T = trl.GRPOTrainer
    fake = SimpleNamespace(
        model=m, accelerator=Acc(), state=SimpleNamespace(global_step=0), beta=beta, loss_type=loss_type,
        args=SimpleNamespace(report_to=[], use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        epsilon_low=eps, epsilon_high=eps_high, top_entropy_quantile=1.0, aux_loss_enabled=False,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        max_completion_length=MAXLEN, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    for k, v in fake_attributes.items():
        setattr(fake, k, v)
    fake._get_per_token_logps_and_entropies = lambda *a, **k: T._get_per_token_logps_and_entropies(fake, *a, **k)
    loss = T._compute_loss(fake, m, inputs)
    return loss, m, {k: v[-1] for k, v in fake._metrics["eval"].items()}


@pytest.mark.parametrize("agg,loss_type", [("token_mean", "dapo"), ("sequence_mean", "grpo"),
                                           ("constant", "dr_grpo")])
def test_equals_trl(model, agg, loss_type):
    temperature, beta = 0.7, 0.04
    lp = hand_logps(model, temperature=temperature)
    batch, inputs = make(old=shifted(lp, OLD_DELTA), ref=shifted(lp, REF_DELTA))
    theirs, m_copy, tm = trl_loss(model, inputs, loss_type, beta, 0.2, 0.28, temperature)
    obj = GRPO(beta=beta, epsilon=0.2, epsilon_high=0.28, loss_agg=agg, max_completion_length=MAXLEN,
               temperature=temperature)
    loss_sum, n, m = obj.loss(model, batch)
    ours = loss_sum / n
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert m["kl"] == pytest.approx(tm["kl"], abs=1e-5)
    assert m["clip_fraction"] == pytest.approx(tm["clip_ratio/region_mean"], abs=1e-6)
    g_ours = torch.autograd.grad(ours, list(model.parameters()))
    g_theirs = torch.autograd.grad(theirs, list(m_copy.parameters()))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- registry
def test_classes_and_config():
    from tunelab.objectives import OBJECTIVES, build_objective, run_config_schema

    RunConfig = run_config_schema()

    assert OBJECTIVES["grpo"] is GRPO and OBJECTIVES["rloo"] is RLOO
    for cls, est in ((GRPO, "grpo"), (RLOO, "rloo")):
        assert (cls.data_kind, cls.needs_reference, cls.generator, cls.advantage_estimator) == \
            ("prompts", True, True, est)
    obj = build_objective(RunConfig(objective="grpo"))
    assert (obj.beta, obj.epsilon, obj.epsilon_high, obj.loss_agg, obj.kl_estimator) == \
        (0.0, 0.2, 0.2, "token_mean", "k3")
    cfg = RunConfig(objective="rloo", rloo={"beta": 0.04, "epsilon_high": 0.28, "loss_agg": "constant"},
                    rl={"max_new_tokens": 64, "temperature": 0.9})
    obj = build_objective(cfg)
    assert isinstance(obj, RLOO) and (obj.beta, obj.epsilon_high, obj.max_completion_length, obj.temperature) == \
        (0.04, 0.28, 64, 0.9)
    with pytest.raises(TunelabError, match="reference.precompute does not apply to grpo"):
        GRPO.check_config(RunConfig(objective="grpo", reference={"precompute": True}))
    with pytest.raises(TunelabError, match="unknown loss_agg"):
        GRPO(loss_agg="mean")
    assert GRPO().measure(None, [], [], 0, None) == {} and GRPO().describe({}) == ""


def test_entropy_metric_equals_the_full_distributions_entropy(model):
    """`entropy` is the mean over completion tokens of H(softmax(logits / T)), from each row alone and unpadded."""
    T = 0.7
    batch, _ = make()
    _, _, metrics = GRPO(temperature=T).loss(model, batch)
    hand = []
    for p, c in ROWS:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0].double() / T
        lp = F.log_softmax(logits, -1)
        hand += [-(lp[len(p) + k - 1].exp() * lp[len(p) + k - 1]).sum().item() for k in range(len(c))]
    assert metrics["entropy"] == pytest.approx(sum(hand) / len(hand), rel=1e-5)
    assert 0 < metrics["entropy"] < math.log(128)

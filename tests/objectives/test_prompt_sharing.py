"""Prompt sharing (objectives/prompt_sharing.py): each prompt encoded once for its completions gives the same
per-token log-probs, entropies, GRPO/RLOO losses, LoRA gradients and reference log-probs as one row per
completion; the fallbacks take the old path; the chunked head's uncheckpointed last chunk keeps gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tunelab.adapters.base import apply_method
from tunelab.models.tiny import ARCHS, HEAD_ARCHS, MOE_ARCHS, tiny_model
from tunelab.objectives import logprobs, prompt_sharing
from tunelab.objectives.grpo import GRPO, RLOO, with_positions
from tunelab.objectives.logprobs import head_logprobs, token_logprobs
from tunelab.objectives.prompt_sharing import SHAREABLE_ARCHS, group_token_logprobs, shared_layout, shares_exactly
from tunelab.objectives.reference import Reference

PAD = 0
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]}
# (prompt, completions): prompts of different lengths (left-padded), completions of different lengths (one of
# length 1), a prompt with a single completion
GROUPS = [([1, 17, 33, 5, 9, 12], [[40, 41, 42], [50], [60, 61, 62, 63, 64]]),
          ([1, 8, 3], [[70, 71], [72, 73, 74, 75]]),
          ([1, 90, 91, 92], [[93]])]


def make(groups=GROUPS, seed=0):
    """A rollout-like batch: [left-padded prompt | right-padded completion] rows, with prompt_index."""
    rows = [(g, p, c) for g, (p, cs) in enumerate(groups) for c in cs]
    P, C = max(len(p) for _, p, _ in rows), max(len(c) for _, _, c in rows)
    B = len(rows)
    ids = torch.full((B, P + C), PAD)
    am = torch.zeros(B, P + C, dtype=torch.long)
    lm = torch.zeros(B, P + C, dtype=torch.bool)
    pm = torch.zeros(B, P + C, dtype=torch.bool)
    for b, (_, p, c) in enumerate(rows):
        ids[b, P - len(p):P], ids[b, P:P + len(c)] = torch.tensor(p), torch.tensor(c)
        am[b, P - len(p):P + len(c)] = 1
        pm[b, P - len(p):P] = True
        lm[b, P:P + len(c)] = True
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": ids, "attention_mask": am, "loss_mask": lm, "prompt_mask": pm,
             "prompt_index": torch.tensor([r[0] for r in rows]),
             "advantages": torch.randn(B, generator=g),
             "old_logprobs": torch.where(lm, -torch.rand(B, P + C, generator=g) * 5, 0.0),
             "ref_logprobs": torch.where(lm, -torch.rand(B, P + C, generator=g) * 5, 0.0)}
    return with_positions(batch)


def lora_model(seed=0):
    model = tiny_model("llama", seed=seed, vocab_size=128)
    apply_method(model, "lora", LORA)
    with torch.no_grad():  # B = 0 at init: give the adapters an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.eval()


@pytest.fixture
def model():
    return lora_model()


@pytest.fixture
def shared_calls(monkeypatch):
    calls = []
    real = prompt_sharing.shared_token_logprobs

    def spy(model, batch, layout, *a, **kw):
        calls.append(layout.packed["input_ids"].shape)
        return real(model, batch, layout, *a, **kw)

    monkeypatch.setattr(prompt_sharing, "shared_token_logprobs", spy)
    return calls


def test_layout_packs_each_prompt_once():
    layout = shared_layout(make())
    ids, pos, mask = (layout.packed[k] for k in ("input_ids", "position_ids", "attention_mask"))
    assert ids.shape == (3, 6 + 3 + 1 + 5)  # one row per prompt, as wide as the first group
    assert ids[0].tolist() == [1, 17, 33, 5, 9, 12, 40, 41, 42, 50, 60, 61, 62, 63, 64]
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 6, 7, 8, 9, 10]  # completions continue the prompt
    m = mask[0, 0]
    assert m[9, :6].all() and not m[9, 6:9].any() and m[9, 9]  # c_2 sees the prompt and itself, not c_1
    assert not m[3, 4:].any() and m[3, :4].all()  # the prompt is causal over itself


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_equal_the_unshared_rows(model, shared_calls, temperature):
    batch = make()
    want_lp, want_ent = token_logprobs(model, batch, temperature=temperature, return_entropy=True)
    lp, ent = group_token_logprobs(model, batch, temperature=temperature, return_entropy=True)
    assert shared_calls == [(3, 15)]
    assert torch.allclose(lp, want_lp, atol=1e-5, rtol=0) and torch.allclose(ent, want_ent, atol=1e-5, rtol=0)
    assert (lp != 0).sum() == batch["loss_mask"].sum()


@pytest.mark.parametrize("objective", [GRPO, RLOO])
@pytest.mark.parametrize("loss_agg", ["token_mean", "sequence_mean"])
def test_loss_and_lora_gradients_equal_the_unshared_rows(objective, loss_agg, shared_calls):
    batch = make()
    results = []
    for share in (True, False):
        model = lora_model()
        loss_sum, n, metrics = objective(beta=0.1, loss_agg=loss_agg, temperature=0.9, share_prompts=share).loss(
            model.train(), batch)
        loss_sum.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((loss_sum.detach(), n, metrics, grads))
    (a, na, ma, ga), (b, nb, mb, gb) = results
    assert len(shared_calls) == 1  # only the shared run took the shared path
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-5) and int(na) == int(nb)
    assert ma.keys() == mb.keys() and all(ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6) for k in ma)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        assert (ga[k] - gb[k]).norm() <= 1e-5 * gb[k].norm() + 1e-8, k


def test_minibatch_with_part_of_a_group_shares_within_it(model, shared_calls):
    batch = make()
    idx = torch.tensor([5, 0, 3, 1])  # group 1 one row, group 0 two rows, group 2's row
    sub = {k: v[idx] if torch.is_tensor(v) else v for k, v in batch.items()}
    lp = group_token_logprobs(model, sub, temperature=1.0)
    assert shared_calls == [(3, 6 + 3 + 1)] and torch.allclose(lp, token_logprobs(model, sub), atol=1e-5, rtol=0)


def test_rows_with_different_prompts_under_one_index_are_not_merged(model):
    batch = make()
    batch["prompt_index"] = torch.zeros_like(batch["prompt_index"])  # a wrong index: prefixes are checked
    layout = shared_layout(batch)
    assert layout.packed["input_ids"].shape[0] == 3
    assert torch.allclose(group_token_logprobs(model, batch), token_logprobs(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["adapter", "copy"])
def test_reference_logprobs_equal_the_unshared_rows(mode, shared_calls):
    model = lora_model() if mode == "adapter" else tiny_model("llama", seed=3, vocab_size=128)
    reference = Reference(model, mode=mode)
    batch = make()
    a = reference.token_logprobs(batch, temperature=0.8, share_prompts=True)
    b = reference.token_logprobs(batch, temperature=0.8)
    assert len(shared_calls) == 1 and torch.allclose(a, b, atol=1e-5, rtol=0)
    if mode == "adapter":  # adapter off: not the policy's log-probs
        assert not torch.allclose(a, token_logprobs(model, batch, temperature=0.8), atol=1e-3)


def test_grpo_reference_term_shares_like_the_loss(shared_calls):
    model = lora_model()
    batch = {k: v for k, v in make().items() if k != "ref_logprobs"}
    GRPO(beta=0.1, reference=Reference(model, mode="adapter")).loss(model, batch)
    assert len(shared_calls) == 2  # the reference's log-probs, then the policy's


def test_switch_off_and_batches_without_index_use_the_old_path(model, shared_calls):
    batch = make()
    GRPO(share_prompts=False).loss(model, batch)
    GRPO().loss(model, {k: v for k, v in batch.items() if k != "prompt_index"})
    one_each = make([(p, cs[:1]) for p, cs in GROUPS])
    GRPO().loss(model, one_each)  # no group with two rows: nothing to share
    assert shared_calls == []


def test_config_switch_reaches_the_objective():
    from tunelab.objectives import build_objective, run_config_schema

    RunConfig = run_config_schema()
    assert RunConfig().grpo.share_prompts is True
    cfg = RunConfig(objective="grpo", grpo={"share_prompts": False})
    assert build_objective(cfg).share_prompts is False


def test_fallbacks_keep_the_old_path(shared_calls):
    from tunelab.adapters import loreft

    eager = lora_model()
    eager.config._attn_implementation = "eager"
    reft = tiny_model("llama", vocab_size=128).eval()
    loreft.wrap(reft, {"r": 4, "positions": "f2+l2"})
    sliding = tiny_model("mistral", vocab_size=128).eval()
    sliding.config.sliding_window = 4
    assert shares_exactly(lora_model()) and not any(shares_exactly(m) for m in (eager, reft, sliding))
    batch = make()
    for m in (eager, reft, sliding):
        assert torch.equal(group_token_logprobs(m, batch), token_logprobs(m, batch))
    assert shared_calls == []


# ------------------------------------------------------------------------------ the chunked head's last chunk
def test_last_chunk_is_not_recomputed_and_gradients_are_exact(monkeypatch):
    model = tiny_model("llama", vocab_size=128)
    hidden = torch.randn(10, 64, requires_grad=True)
    targets = torch.randint(0, 128, (10,))
    calls = []
    real = logprobs.checkpoint
    monkeypatch.setattr(logprobs, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    lp = head_logprobs(model, hidden, targets, chunk_size=4)
    assert len(calls) == 2  # chunks of 4, 4, 2: the last one runs plainly
    lp.sum().backward()
    got_h, got_w = hidden.grad.clone(), model.lm_head.weight.grad.clone()
    hidden.grad, model.lm_head.weight.grad = None, None
    want = -F.cross_entropy(model.lm_head(hidden).float(), targets, reduction="none")
    want.sum().backward()
    assert torch.allclose(lp, want, atol=1e-6)
    assert torch.allclose(got_h, hidden.grad, atol=1e-6) and torch.allclose(got_w, model.lm_head.weight.grad,
                                                                            atol=1e-6)


def test_copy_reference_of_a_lora_policy_shares_too():
    model = lora_model()
    reference = Reference(copy.deepcopy(model), mode="copy")
    batch = make()
    assert torch.allclose(reference.token_logprobs(batch, share_prompts=True), token_logprobs(model, batch),
                          atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", sorted(SHAREABLE_ARCHS & set(ARCHS + HEAD_ARCHS + MOE_ARCHS)))
def test_every_listed_architecture_we_can_build_shares_exactly(arch, shared_calls):
    """SHAREABLE_ARCHS is a claim per architecture: check it on every one the tiny builder makes (qwen2_moe's
    config sets sliding_window=0, which the check treats conservatively as a window: the old path runs)."""
    model = tiny_model(arch, seed=0, vocab_size=128).eval()
    assert shares_exactly(model) == (arch != "qwen2_moe")
    batch = make()
    with torch.no_grad():
        want = token_logprobs(model, batch)
        got = group_token_logprobs(model, batch)
    assert shared_calls == ([(3, 15)] if arch != "qwen2_moe" else [])
    assert torch.allclose(got, want, atol=1e-5, rtol=0)

"""The reference model: adapter-off ≡ the base model loaded separately, cached ≡ on-the-fly, moving reference,
and reference-free objectives never build one."""

import pytest
import torch

from tunelab.adapters.base import adapter_modules, adapter_parameters, get_method
from tunelab.data.preference import collate_pairs, encode_pairs, to_pair
from tunelab.data.sources import Record
from tunelab.data.templates import get_template
from tunelab.objectives.dpo import DPO
from tunelab.objectives.logprobs import sequence_logprobs, token_logprobs
from tunelab.objectives.reference import Reference, fill_cache

from pref_helpers import pair_rows
from tests.helpers import train_losses


def _examples(tokenizer, n=4):
    tmpl = get_template("chatml", tokenizer)
    return encode_pairs(tokenizer, [to_pair(Record(r, f"f:{i}")) for i, r in enumerate(pair_rows(n))], tmpl)[0]


def _lora(model):
    lora = get_method("lora")
    lora.wrap(model, {"r": 4})
    with torch.no_grad():  # make the adapter non-zero, so policy ≠ base
        for p in adapter_parameters(model).values():
            p.normal_(0, 0.05)
    return model


def test_adapter_reference_is_the_base_model(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    policy = _lora(AutoModelForCausalLM.from_pretrained(tiny_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    batch = collate_pairs(_examples(tokenizer), tokenizer.pad_token_id)
    ref = Reference(policy)
    assert ref.mode == "adapter" and ref.model is None  # no second copy
    with torch.no_grad():
        want = sequence_logprobs(token_logprobs(base, batch), batch)[0]
        pol = sequence_logprobs(token_logprobs(policy, batch), batch)[0]
    torch.testing.assert_close(ref.logps(batch), want, atol=1e-5, rtol=0)
    assert (pol - want).abs().max() > 1e-3  # and the policy itself really differs
    assert all(m.adapter_enabled for _, m in adapter_modules(policy))  # switched back on after the reference


def test_cached_reference_equals_on_the_fly(tiny, tokenizer, tmp_path):
    policy = tiny("llama")
    exs = _examples(tokenizer, 6)
    ref = Reference(policy)  # full model → frozen copy
    assert ref.mode == "copy"
    with torch.no_grad():
        for p in policy.parameters():  # move the policy away from the reference
            p.add_(torch.randn_like(p) * 0.01)
    batch = collate_pairs(exs[:4], tokenizer.pad_token_id)
    live_loss, _, live_m = DPO(reference=ref).loss(policy, batch)
    assert fill_cache(tmp_path / "ref.safetensors", ref, {"train": exs}, tokenizer.pad_token_id, batch_size=3) is False
    cached = collate_pairs(exs[:4], tokenizer.pad_token_id)
    assert "ref_logps" in cached
    cached_loss, _, cached_m = DPO(reference=None).loss(policy, cached)
    torch.testing.assert_close(cached_loss, live_loss, atol=1e-5, rtol=1e-6)
    assert cached_m["reward_margin"] == pytest.approx(live_m["reward_margin"], abs=1e-5)
    for e in exs:
        e.ref = None
    assert fill_cache(tmp_path / "ref.safetensors", ref, {"train": exs}, tokenizer.pad_token_id) is True  # reread
    assert exs[0].ref is not None


def test_moving_reference(tiny, tokenizer):
    batch = collate_pairs(_examples(tokenizer, 2), tokenizer.pad_token_id)
    # Full copy: θ_ref ← α θ + (1 − α) θ_ref
    policy = tiny("llama")
    ref = Reference(policy, sync_every=2, sync_alpha=0.5)
    w0 = ref.model.lm_head.weight.clone()
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)
    assert not ref.on_step(1) and ref.on_step(2)
    torch.testing.assert_close(ref.model.lm_head.weight, w0 + 0.5)
    # Adapter: a second set of adapter weights, swapped in for the reference forward, swapped back after.
    policy = tiny("llama")
    get_method("lora").wrap(policy, {"r": 4})
    ref = Reference(policy, sync_every=1, sync_alpha=1.0)
    base = ref.logps(batch)
    with torch.no_grad():
        for p in adapter_parameters(policy).values():
            p.normal_(0, 0.05)
    before = {k: p.clone() for k, p in adapter_parameters(policy).items()}
    torch.testing.assert_close(ref.logps(batch), base)  # still the initial adapter (= base)
    ref.on_step(1)  # hard sync: reference = current policy
    with torch.no_grad():
        now = sequence_logprobs(token_logprobs(policy.eval(), batch), batch)[0]
    torch.testing.assert_close(ref.logps(batch), now, atol=1e-6, rtol=0)
    assert all(torch.equal(before[k], p) for k, p in adapter_parameters(policy).items())  # policy restored


def test_reference_free_objectives_build_no_reference(monkeypatch, tiny_dir, pairs_file, tmp_path):
    from tunelab.config import RunConfig
    from tunelab.objectives import build_objective, reference
    from tunelab.train.launch import train

    def boom(*a, **k):
        raise AssertionError("a reference model was built")

    monkeypatch.setattr(reference.Reference, "__init__", boom)
    for obj in ("simpo", "orpo"):
        cfg = RunConfig.model_validate({
            "output_dir": str(tmp_path / obj), "objective": obj, "method": "full",
            "model": {"name": str(tiny_dir)}, "data": {"train": str(pairs_file), "max_length": 64},
            "train": {"max_steps": 1, "batch_size": 2}, "samples": {"n_heldout": 0}})
        assert build_objective(cfg, reference=object()).reference is None
        out = train(cfg)
        assert (out / "results.json").exists() and not (out / "reference_logps.safetensors").exists()


def _losses(run_dir):
    return [loss for _, loss in train_losses(run_dir)]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_moving_reference_is_checkpointed_and_resumes_exactly(tiny_dir, pairs_file, tmp_path, method):
    """TR-DPO's moving reference syncs through the loop's on_step hook (every 2 steps here) and its weights are in
    every checkpoint: a run killed after step 5 and resumed from step 4 gives the uninterrupted loss curve."""
    from safetensors.torch import load_file

    from tunelab.config import RunConfig
    from tunelab.train.launch import train

    def cfg(name):
        return RunConfig.model_validate({
            "output_dir": str(tmp_path / name), "objective": "dpo", "method": method,
            "model": {"name": str(tiny_dir)}, "data": {"train": str(pairs_file), "max_length": 64,
                                                       "eval_fraction": 0.0},
            "lora": {"r": 4}, "reference": {"sync_every": 2, "sync_alpha": 0.5},
            "train": {"max_steps": 6, "batch_size": 2, "lr": 5e-3, "save_every": 2, "keep_last": 3},
            "samples": {"n_heldout": 0}, "pref": {"probe": 2}})

    full = train(cfg("full"))
    cut = cfg("cut")
    train(cut, stop_after=5)  # killed after step 5: the last checkpoint is step 4, two syncs in
    saved = load_file(str(tmp_path / "cut" / "checkpoints" / "step-000004" / "objective.safetensors"))
    prefix = "adapter." if method == "lora" else "copy."
    assert saved and all(k.startswith(prefix) for k in saved)
    resumed = train(cut)
    a, b = _losses(full), _losses(resumed)
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, abs=1e-6, rel=0)
    assert b[4] != pytest.approx(_losses_without_sync(tmp_path, cfg)[4], abs=1e-6)  # the sync mattered


def _losses_without_sync(tmp_path, cfg):
    from tunelab.train.launch import train

    c = cfg("nosync")
    c.reference.sync_every = None
    return _losses(train(c))

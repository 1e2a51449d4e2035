"""LoRA mechanics: targets, parameter counts, merge, disable, state dicts, extras and tied weights, errors."""

import copy
import math

import pytest
import torch
from adapter_helpers import VOCAB, batch, logits, make, perturb
from torch import nn

from tunelab.adapters import base, lora
from tunelab.adapters.base import get_method
from tunelab.adapters.extras import FullyTrained
from tunelab.errors import TunelabError

@pytest.fixture
def ids():
    return batch()


LLAMA_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def leaves(names):
    return {n.rpartition(".")[2] for n in names}


def test_wrap_starts_equal_and_counts_exactly(ids):
    model = make("llama")
    before = logits(model, ids)
    keys_before = set(model.state_dict())
    report = lora.wrap(model, lora.LoraConfig(r=4))
    assert leaves(report.replaced) == LLAMA_LEAVES and len(report.replaced) == 14
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)  # B = 0
    expected = sum(4 * (model.get_submodule(n).in_features + model.get_submodule(n).out_features)
                   for n in report.replaced)
    assert report.trainable == expected
    assert report.total == sum(p.numel() for p in model.parameters())
    # base keys unchanged; only lora_A/lora_B keys added
    keys_after = set(model.state_dict())
    assert keys_before <= keys_after
    assert all(".lora_A." in k or ".lora_B." in k for k in keys_after - keys_before)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora.adapter_state_dict(model))


def test_summary_line():
    report = base.AdapterReport("lora", ["a"] * 30, 1_843_200, 136_358_208)
    assert report.summary() == "lora: 30 modules, trainable 1,843,200 / 136,358,208 (1.35%)"


def test_scaling_lora_and_rslora():
    lin = nn.Linear(8, 6)
    assert lora.LoraLinear(lin, r=4, alpha=16).scaling == 4.0
    assert lora.LoraLinear(lin, r=4, alpha=16, use_rslora=True).scaling == 8.0
    layer = lora.LoraLinear(lin, r=4, alpha=16)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.lora_A.weight.shape == (4, 8) and layer.lora_B.weight.shape == (6, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(8)  # kaiming_uniform(a=sqrt(5)) bound on fan_in 8
    assert layer.lora_A.weight.abs().max() <= bound


def test_forward_formula():
    lin = nn.Linear(8, 6)
    layer = lora.LoraLinear(lin, r=2, alpha=3)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 8)
    want = lin(x) + 1.5 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), want)


def test_rank_and_alpha_patterns():
    model = make("llama")
    lora.wrap(model, lora.LoraConfig(r=8, alpha=16, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 4}))
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.r, attn.q_proj.scaling) == (8, 2.0)
    assert (attn.v_proj.r, attn.v_proj.scaling) == (2, 8.0)
    assert (attn.o_proj.r, attn.o_proj.scaling) == (8, 0.5)


def test_merge_equals_unmerged_and_restores_plain_model(ids, tmp_path):
    model = make("llama")
    keys = set(model.state_dict())
    lora.wrap(model, lora.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head", "down_proj"],
                                     modules_to_save=["model.norm"]))
    perturb(model)
    want = logits(model, ids)
    merged = lora.merge(model)
    assert len(merged) == 2 * 3 + 2 and not base.has_adapter(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("proj", "lm_head")))
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(again, ids), want, atol=1e-5, rtol=0)


def test_disabled_is_the_base_model(ids):
    model = make("gemma")
    base_out = logits(model, ids)
    lora.wrap(model, lora.LoraConfig(r=4, modules_to_save=["embed_tokens", "model.norm"]))
    perturb(model)
    adapted = logits(model, ids)
    assert (adapted - base_out).abs().max() > 1e-3
    with lora.disabled(model):
        torch.testing.assert_close(logits(model, ids), base_out, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, ids), adapted, atol=0, rtol=0)
    lora.set_enabled(model, False)
    torch.testing.assert_close(logits(model, ids), base_out, atol=0, rtol=0)
    lora.set_enabled(model, True)
    with pytest.raises(RuntimeError, match="no adapter"):
        with lora.disabled(make("llama")):
            pass


def test_reference_pass_keeps_policy_graph(ids):
    """DPO pattern: policy forward (with grad), reference forward under disabled(), then backward."""
    model = make("llama")
    lora.wrap(model, lora.LoraConfig(r=4, modules_to_save=["lm_head"]))
    perturb(model)
    model.train()
    policy = model(input_ids=ids).logits.sum()
    with torch.no_grad(), lora.disabled(model):
        model(input_ids=ids)
    policy.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_tied_extras_stay_tied_through_training_and_merge(ids, tmp_path):
    model = make("gemma")
    report = lora.wrap(model, lora.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert set(report.extras) == {"lm_head", "model.embed_tokens"} and len(report.tied) == 1
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.requires_grad
    assert list(lora.adapter_state_dict(model)).count("lm_head.weight") + \
        list(lora.adapter_state_dict(model)).count("model.embed_tokens.weight") == 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want = logits(model, ids)
    lora.merge(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(again, ids), want, atol=1e-5, rtol=0)


def test_untied_extras_when_tying_not_ensured(ids):
    model = make("gemma")
    emb = model.model.embed_tokens.weight.detach().clone()
    lora.wrap(model, lora.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                     ensure_weight_tying=False))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.model.embed_tokens.weight.requires_grad and not model.config.tie_word_embeddings
    perturb(model)
    assert torch.equal(model.model.embed_tokens.weight, emb)


def test_lora_on_tied_head_unties_on_merge(ids, tmp_path):
    model = make("gemma")
    emb = model.model.embed_tokens.weight.detach().clone()
    lora.wrap(model, lora.LoraConfig(r=4, target_modules=["lm_head"]))
    perturb(model)
    want = logits(model, ids)
    lora.merge(model)
    assert torch.equal(model.model.embed_tokens.weight, emb)  # the embeddings did not absorb the delta
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(again, ids), want, atol=1e-5, rtol=0)


def test_state_dict_roundtrip_and_errors(ids):
    model = make("qwen2")
    cfg = lora.LoraConfig(r=4, modules_to_save=["lm_head"])
    lora.wrap(model, cfg)
    perturb(model)
    sd = {k: v.clone() for k, v in lora.adapter_state_dict(model).items()}
    other = make("qwen2")
    lora.wrap(other, cfg)
    lora.load_adapter_state_dict(other, sd)
    torch.testing.assert_close(logits(other, ids), logits(model, ids), atol=0, rtol=0)
    with pytest.raises(TunelabError, match="unexpected key 'nope'"):
        lora.load_adapter_state_dict(other, {**sd, "nope": torch.zeros(1)})
    with pytest.raises(TunelabError, match="missing key"):
        lora.load_adapter_state_dict(other, dict(list(sd.items())[1:]))
    key = next(k for k in sd if k.endswith("lora_A.weight"))
    with pytest.raises(TunelabError, match="shape"):
        lora.load_adapter_state_dict(other, {**sd, key: torch.zeros(3, 3)})


@pytest.mark.parametrize("pattern,expect", [
    (["q_proj"], {"q_proj"}),
    (["self_attn.v_proj", "model.layers.1.mlp.up_proj"], {"v_proj", "up_proj"}),
    (["model.layers.*.mlp.*_proj"], {"gate_proj", "up_proj", "down_proj"}),
    ([r".*\.(q|k)_proj"], {"q_proj", "k_proj"}),
    ("all-linear", LLAMA_LEAVES),
])
def test_target_patterns(pattern, expect):
    assert leaves(base.match_modules(make("llama"), pattern, what="t")) == expect


def test_bad_patterns_name_the_culprit():
    model = make("llama")
    with pytest.raises(TunelabError, match=r"lora.target_modules: pattern 'foo' matches no module; "
                                           r"linear modules are e.g. q_proj, k_proj"):
        lora.wrap(model, lora.LoraConfig(target_modules=["q_proj", "foo"]))
    with pytest.raises(TunelabError, match="pattern 'mlp' matches only modules this method cannot wrap"):
        lora.wrap(model, lora.LoraConfig(target_modules=["mlp"]))
    with pytest.raises(TunelabError, match="lora.modules_to_save: pattern 'embeddings' matches no module"):
        lora.wrap(model, lora.LoraConfig(modules_to_save=["embeddings"]))
    assert not base.has_adapter(model) and all(p.requires_grad for p in model.parameters())


def test_all_linear_skips_head_and_routers():
    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(4, 2)
            self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(4, 4), "mlp": Moe()})])
            self.lm_head = nn.Linear(4, 10)

    names = base.match_modules(Toy(), "all-linear", what="t")
    assert names == ["layers.0.q_proj", "layers.0.mlp.experts.0", "layers.0.mlp.experts.1"]
    assert "layers.0.mlp.gate" in base.match_modules(Toy(), ["gate"], what="t")  # explicit names win


def test_extras_expand_and_conflicts():
    model = make("llama")
    report = lora.wrap(model, lora.LoraConfig(r=2, target_modules="all-linear", modules_to_save=["layers.1.mlp"]))
    assert {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"} <= set(report.extras)
    assert not any(n.startswith("model.layers.1.mlp") for n in report.replaced)  # extras are not targeted
    assert isinstance(model.model.layers[1].mlp.up_proj, FullyTrained)
    assert model.model.layers[1].mlp.up_proj.in_features == 64  # attribute falls through to the module
    with pytest.raises(TunelabError, match="already has an adapter"):
        lora.wrap(model, lora.LoraConfig())


def test_config_validation_and_dispatch():
    with pytest.raises(Exception):
        lora.LoraConfig(rank=4)
    with pytest.raises(Exception):
        lora.LoraConfig(r=0)
    assert get_method("lora") is lora and get_method("lora").Config is lora.LoraConfig
    with pytest.raises(TunelabError, match="adapter method 'lorax' is unknown; choose from .*lora"):
        get_method("lorax")


def test_dropout_only_in_training(ids):
    model = make("llama")
    lora.wrap(model, lora.LoraConfig(r=4, dropout=0.5))
    perturb(model)
    model.eval()
    torch.testing.assert_close(logits(model, ids), logits(model, ids), atol=0, rtol=0)
    model.train()
    assert not torch.equal(logits(model, ids), logits(model, ids))


def test_bf16_base_gets_fp32_adapters():
    model = make("llama").to(torch.bfloat16)
    lora.wrap(model, lora.LoraConfig(r=4))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    assert model(input_ids=batch()).logits.dtype == torch.bfloat16
    lora.merge(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_deepcopy_keeps_adapter(ids):
    model = make("llama")
    lora.wrap(model, lora.LoraConfig(r=4, modules_to_save=["lm_head"]))
    perturb(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone, ids), logits(model, ids), atol=0, rtol=0)
    assert clone.lm_head.out_features == VOCAB


def test_linear_params_follow_adapter_state():
    """Chunked log-prob code applies the head with F.linear; the weights it gets must match forward()."""
    x = torch.randn(3, 64)
    for extras, targets in [(["lm_head"], ["q_proj"]), ([], ["lm_head"])]:
        model = make("gemma")
        lora.wrap(model, lora.LoraConfig(r=4, target_modules=targets, modules_to_save=extras))
        perturb(model)
        head = model.get_output_embeddings()
        for enabled in (True, False):
            lora.set_enabled(model, enabled)
            w, b = base.linear_params(head)
            torch.testing.assert_close(nn.functional.linear(x, w, b), head(x), atol=1e-5, rtol=0)
        lora.set_enabled(model, True)
        assert base.linear_params(head)[0].requires_grad
    plain = nn.Linear(4, 2)
    assert base.linear_params(plain) == (plain.weight, plain.bias)

"""DoRA: the formula, detached norm, merge, and equivalence with PEFT 0.21's `use_dora=True` (test-only oracle)."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from adapter_helpers import batch, logits, make, perturb
from torch import nn

from tunelab.adapters import base, dora, get_method, peft_format

peft = pytest.importorskip("peft")
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _layer(bias=True, r=2, alpha=3.0, seed=0):
    torch.manual_seed(seed)
    layer = dora.DoraLinear(nn.Linear(8, 6, bias=bias), r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.rand(6) + 0.5)
    return layer


def test_init_magnitude_is_row_norm_and_model_starts_equal():
    ids = batch()
    model = make("llama")
    before = logits(model, ids)
    keys_before = set(model.state_dict())
    report = dora.wrap(model, dora.DoraConfig(r=4))
    torch.testing.assert_close(logits(model, ids), before, atol=1e-6, rtol=0)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, dora.DoraLinear) and q.lora_magnitude_vector.shape == (q.out_features,)
    torch.testing.assert_close(q.lora_magnitude_vector, q.weight.norm(dim=1))
    added = set(model.state_dict()) - keys_before
    assert keys_before <= set(model.state_dict())
    assert {k.rpartition("q_proj.")[2] for k in added if "layers.0.self_attn.q_proj" in k} == set(dora.PEFT_SUFFIXES)
    assert report.method == "dora" and report.trainable == sum(
        4 * (m.in_features + m.out_features) + m.out_features for _, m in base.adapter_modules(model))
    assert get_method("dora") is dora


def test_forward_formula_with_detached_norm():
    layer = _layer()
    x = torch.randn(5, 8)
    y = layer(x)
    w0, b, s = layer.weight, layer.bias, layer.scaling
    A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    n = (w0 + s * B @ A).norm(dim=1).detach()  # stop-gradient, paper §4.3
    want = (m / n) * (x @ w0.T + s * x @ A.T @ B.T) + b
    torch.testing.assert_close(y, want)
    grads = torch.autograd.grad(y.square().sum(), [A, B, m])
    wants = torch.autograd.grad(want.square().sum(), [A, B, m])
    for g, h in zip(grads, wants):
        torch.testing.assert_close(g, h)
    # weight-space form (used by chunked lm_head code) equals forward, gradients included
    w, bias = layer.linear_params()
    torch.testing.assert_close(F.linear(x, w, bias), y)
    torch.testing.assert_close(torch.autograd.grad(F.linear(x, w, bias).square().sum(), m)[0], grads[2])


def test_merge_equals_unmerged_and_formula():
    layer = _layer(bias=True)
    x = torch.randn(4, 8)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    delta = layer.delta_weight().detach()
    m = layer.lora_magnitude_vector.detach()
    plain = layer.unwrap()
    assert type(plain) is nn.Linear
    want = (m / (w0 + delta).norm(dim=1)).unsqueeze(1) * (w0 + delta)
    torch.testing.assert_close(plain.weight, want)
    torch.testing.assert_close(plain(x), y, atol=ATOL, rtol=0)

    ids = batch()
    model = make("qwen2")  # q/k/v projections have biases
    dora.wrap(model, dora.DoraConfig(r=4, alpha=8))
    perturb(model)
    before = logits(model, ids)
    dora.merge(model)
    assert not base.has_adapter(model)
    torch.testing.assert_close(logits(model, ids), before, atol=ATOL, rtol=0)


def test_disabled_is_the_base_model():
    ids = batch()
    model = make("llama")
    want = logits(model, ids)
    dora.wrap(model, dora.DoraConfig(r=4))
    perturb(model)
    assert (logits(model, ids) - want).abs().max() > 1e-3
    with dora.disabled(model):
        torch.testing.assert_close(logits(model, ids), want, atol=0, rtol=0)


def _pair(arch="llama", rslora=False, dropout=0.0, **kw):
    ours = make(arch)
    cfg = dora.DoraConfig(r=4, alpha=8, use_rslora=rslora, dropout=dropout, **kw)
    report = dora.wrap(ours, cfg)
    perturb(ours)
    theirs = get_peft_model(make(arch), PeftLoraConfig(r=4, lora_alpha=8, use_rslora=rslora, lora_dropout=dropout,
                                                      target_modules=report.replaced, use_dora=True))
    result = set_peft_model_state_dict(theirs, peft_format.peft_state_dict(ours))
    assert not result.unexpected_keys
    return ours, theirs.eval()


@pytest.mark.parametrize("arch,rslora", [("llama", False), ("phi3", True)])
def test_forward_matches_peft_with_copied_weights(arch, rslora):
    ids = batch()
    ours, theirs = _pair(arch, rslora)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)
    assert (logits(ours, ids) - logits(make(arch), ids)).abs().max() > 1e-3


def _step(model, ids, opt):
    out = model(input_ids=ids).logits[:, :-1]
    loss = F.cross_entropy(out.reshape(-1, out.size(-1)), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    opt.zero_grad()
    return loss.item(), grads


def test_training_matches_peft():
    """Same weights, same batches, same optimizer: gradients and outputs stay equal step after step."""
    ids = batch(t=12)
    ours, theirs = _pair("llama")
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    ours.train(), theirs.train()
    losses = []
    for _ in range(3):
        (la, ga), (lb, gb) = _step(ours, ids, opts[0]), _step(theirs, ids, opts[1])
        losses.append(la)
        assert la == pytest.approx(lb, abs=1e-5)
        gb = {k.replace(".weight", "") if "magnitude" in k else k: g for k, g in gb.items()}
        assert set(ga) == set(gb)
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], atol=1e-5, rtol=1e-4, msg=k)
    assert losses[-1] < losses[0]
    ours.eval(), theirs.eval()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)


def test_dropout_in_training_matches_peft():
    ids = batch()
    ours, theirs = _pair("llama", dropout=0.2)
    ours.train(), theirs.train()
    outs = []
    for model in (ours, theirs):
        torch.manual_seed(7)  # same dropout masks, drawn in the same layer order
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
    ours.eval()
    assert (logits(ours, ids) - outs[0]).abs().max() > 1e-4  # dropout really acted


@pytest.mark.parametrize("arch,extras", [("llama", []), ("gemma", ["lm_head"])])
def test_export_loads_in_peft_and_back(tmp_path, arch, extras):
    ids = batch()
    ours = make(arch)
    cfg = dora.DoraConfig(r=4, alpha=16, modules_to_save=extras, rank_pattern={"v_proj": 2})
    dora.wrap(ours, cfg)
    perturb(ours)
    dora.export(ours, cfg, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["use_dora"] is True and conf["peft_type"] == "LORA"
    theirs = PeftModel.from_pretrained(make(arch), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=ATOL, rtol=0)

    back = make(arch)
    report = dora.load(back, tmp_path)
    assert report.method == "dora"
    assert isinstance(back.model.layers[0].self_attn.q_proj, dora.DoraLinear)
    assert back.model.layers[0].self_attn.v_proj.r == 2
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), atol=0, rtol=0)


def test_peft_saved_dora_adapter_imports(tmp_path):
    ids = batch()
    theirs = get_peft_model(make("mistral"), PeftLoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                           target_modules=["q_proj", "down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.eval().save_pretrained(tmp_path)
    ours = make("mistral")
    report = peft_format.load_peft(ours, tmp_path)  # the generic reader routes use_dora to this method
    assert report.method == "dora" and len(report.replaced) == 4
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)
    with dora.disabled(ours), theirs.disable_adapter():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)


def test_own_state_dict_roundtrip():
    ids = batch()
    model = make("llama")
    cfg = dora.DoraConfig(r=4)
    dora.wrap(model, cfg)
    perturb(model)
    sd = dora.adapter_state_dict(model)
    assert any(k.endswith(".lora_magnitude_vector") for k in sd)
    again = make("llama")
    dora.wrap(again, cfg)
    dora.load_adapter_state_dict(again, sd)
    torch.testing.assert_close(logits(again, ids), logits(model, ids), atol=0, rtol=0)


def test_bf16_base_keeps_fp32_adapter():
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    layer = dora.DoraLinear(lin, r=2, alpha=4)
    assert layer.lora_magnitude_vector.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    w, b = layer.linear_params()
    ref = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=1e-2)
    assert layer.unwrap().weight.dtype == torch.bfloat16


def test_eval_norm_cache_follows_in_place_updates():
    layer = _layer().eval()
    x = torch.randn(2, 8)
    first = layer.weight_norm()
    assert layer.weight_norm() is first  # cached between forwards in eval mode
    with torch.no_grad():
        layer.lora_B.weight.add_(0.5)  # an optimizer step or a weight load: in place, version bumps
    n = (layer.weight + layer.delta_weight()).norm(dim=1)
    torch.testing.assert_close(layer.weight_norm(), n)
    assert not torch.allclose(n, first)
    layer.train()
    assert layer.weight_norm() is not layer.weight_norm()  # never cached while training
    torch.testing.assert_close(layer(x), F.linear(x, *layer.linear_params()))


def test_incomplete_dora_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    from tunelab.errors import TunelabError

    def write(path, tensors):
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 4}))
        save_file(tensors, str(path / "adapter_model.safetensors"))

    write(tmp_path / "empty", {})
    with pytest.raises(TunelabError, match="no lora_A/lora_B tensors"):
        peft_format.load_peft(make("llama"), tmp_path / "empty")
    key = "base_model.model.model.layers.0.self_attn.q_proj."
    write(tmp_path / "nomag", {key + "lora_A.weight": torch.zeros(4, 64), key + "lora_B.weight": torch.zeros(64, 4)})
    with pytest.raises(TunelabError, match="missing key .*lora_magnitude_vector"):
        peft_format.load_peft(make("llama"), tmp_path / "nomag")

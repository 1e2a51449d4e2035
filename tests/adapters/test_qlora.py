"""QLoRA/QDoRA: NF4 base layers, training, memory, merge, checkpoints, PEFT export, config."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from adapter_helpers import batch, logits, make, perturb, train
from torch import nn

from tunelab.adapters import base, dora, get_method, nf4, qlora
from tunelab.errors import TunelabError
from tunelab.models.tiny import tiny_model




def _dequantized_copy(model, arch="llama"):
    """A float model whose targeted weights are replaced by their NF4 dequantisation: the quantised base."""
    ref = make(arch)
    with torch.no_grad():
        for name, m in base.adapter_modules(model):
            ref.get_submodule(name).weight.copy_(m.base_weight())
    return ref


def test_layer_state_keys_and_memory():
    model = make("llama")
    keys_before = set(model.state_dict())
    report = qlora.wrap(model, qlora.QLoraConfig(r=4))
    assert report.method == "qlora" and len(report.replaced) == 14 and "NF4" in report.notes[-1]
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, qlora.QLoraLinear) and "weight" not in q._parameters
    assert q._base_layer.weight is None  # the float copy is gone
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" not in sd
    assert sd["model.layers.0.self_attn.q_proj.weight_nf4"].dtype == torch.uint8
    added = {k.removeprefix("model.layers.0.self_attn.q_proj.") for k in set(sd) - keys_before
             if k.startswith("model.layers.0.self_attn.q_proj.")}
    assert added == {"weight_nf4", "weight_absmax_q", "weight_absmax_scale", "weight_absmax_mean",
                     "lora_A.weight", "lora_B.weight"}
    # the trainable state (what checkpoints and adapter files hold) has no quantised tensors
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(qlora.adapter_state_dict(model))
    assert all(".lora_" in k for k in trainable)
    # total still counts the quantised weights; memory ≤ 0.3× their fp16 size
    assert report.total == sum(p.numel() for p in make("llama").parameters()) + report.trainable
    layers = [m for _, m in base.adapter_modules(model)]
    q_bytes = sum(m.quantized_bytes() for m in layers)
    fp16 = sum(2 * m.in_features * m.out_features for m in layers)
    assert q_bytes <= 0.3 * fp16, q_bytes / fp16


def test_starts_equal_to_quantised_base_and_disable():
    ids = batch()
    for use_dora in (False, True):
        model = make("llama")
        qlora.wrap(model, qlora.QLoraConfig(r=4, use_dora=use_dora))
        ref = _dequantized_copy(model)
        torch.testing.assert_close(logits(model, ids), logits(ref, ids), atol=1e-5, rtol=0)
        perturb(model)
        with qlora.disabled(model):
            torch.testing.assert_close(logits(model, ids), logits(ref, ids), atol=1e-6, rtol=0)
        # the quantised base is close to, not equal to, the float one
        assert 0 < (logits(ref, ids) - logits(make("llama"), ids)).abs().max() < 0.5


def test_nf4_matmul_gradients_and_no_saved_weight():
    lin = nn.Linear(64, 32)
    layer = qlora.QLoraLinear(lin, 4, 8, 0.0, False, qlora.QLoraConfig(double_quant=False))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 64, requires_grad=True)
    w = layer.base_weight()
    w_ref = w.clone().requires_grad_(False)
    y = layer(x)
    ref = F.linear(x, w_ref, layer.bias) + layer.lora_forward(x)
    torch.testing.assert_close(y, ref)
    gx = torch.autograd.grad(y.square().sum(), x)[0]
    gx_ref = torch.autograd.grad(ref.square().sum(), x)[0]
    torch.testing.assert_close(gx, gx_ref)
    # the autograd graph keeps no float weight: only x for the LoRA path and the layer reference
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer.base_forward(x)
    assert (32, 64) not in saved and (64, 32) not in saved


def test_qlora_trains_and_roundtrips(tmp_path):
    ids = batch(t=12)
    model = tiny_model("llama", vocab_size=128).eval()
    cfg = qlora.QLoraConfig(r=4, alpha=8)
    qlora.wrap(model, cfg)
    losses = train(model, ids, steps=8)
    assert losses[-1] < losses[0] - 0.25, losses
    want = logits(model, ids)

    qlora.export(model, cfg, tmp_path, base_model_name_or_path="tiny-llama")
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    quant = json.loads((tmp_path / qlora.QUANT_FILE).read_text())
    assert conf["use_dora"] is False and conf["base_model_name_or_path"] == "tiny-llama"
    assert quant["quantization"] == "nf4" and quant["block_size"] == 64 and quant["double_quant"] is True
    back = make("llama")
    report = qlora.load(back, tmp_path)  # re-quantises the float base, then loads the adapter
    assert report.method == "qlora" and isinstance(back.model.layers[1].mlp.up_proj, qlora.QLoraLinear)
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)

    merged = qlora.merge(back)
    assert len(merged) == 14 and not base.has_adapter(back)
    up = back.model.layers[1].mlp.up_proj
    assert type(up) is nn.Linear and up.weight.dtype == torch.float32 and not up.weight.requires_grad
    torch.testing.assert_close(logits(back, ids), want, atol=1e-5, rtol=0)


def test_qdora_runs_trains_and_merges(tmp_path):
    ids = batch(t=12)
    model = make("llama")
    cfg = qlora.QLoraConfig(r=4, alpha=8, use_dora=True, double_quant=False)
    report = qlora.wrap(model, cfg)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, qlora.QDoraLinear) and isinstance(q, dora.DoraLinear) and "QDoRA" in report.notes[-1]
    torch.testing.assert_close(q.lora_magnitude_vector, q.base_weight().norm(dim=1))  # norms of dequantised W0
    losses = train(model, ids, steps=8)
    assert losses[-1] < losses[0] - 0.25, losses
    want = logits(model, ids)
    qlora.export(model, cfg, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    back = make("llama")
    qlora.load(back, tmp_path)
    assert isinstance(back.model.layers[0].self_attn.q_proj, qlora.QDoraLinear)
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)
    qlora.merge(back)
    torch.testing.assert_close(logits(back, ids), want, atol=1e-5, rtol=0)


def test_peft_applies_the_export_to_the_dequantised_base(tmp_path):
    """The exported adapter is plain PEFT: on the quantised base's float copy PEFT reproduces our outputs."""
    peft = pytest.importorskip("peft")
    ids = batch()
    for use_dora in (False, True):
        model = make("qwen2")
        cfg = qlora.QLoraConfig(r=4, alpha=8, use_dora=use_dora)
        qlora.wrap(model, cfg)
        perturb(model)
        out = tmp_path / str(use_dora)
        qlora.export(model, cfg, out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(_dequantized_copy(model, "qwen2"), out).eval()
        torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_bf16_compute_dtype_and_bf16_base():
    ids = batch()
    model = make("llama")
    qlora.wrap(model, qlora.QLoraConfig(r=4, compute_dtype="bfloat16"))
    perturb(model)
    q = model.model.layers[0].self_attn.q_proj
    assert q.base_weight().dtype == torch.bfloat16 and q.lora_A.weight.dtype == torch.float32
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    qlora.merge(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # the original dtype

    half = make("llama").to(torch.bfloat16)
    qlora.wrap(half, qlora.QLoraConfig(r=4))
    q = half.model.layers[0].self_attn.q_proj
    assert q.compute_dtype == torch.bfloat16 and q.lora_B.weight.dtype == torch.float32
    assert logits(half, ids).dtype == torch.bfloat16


def test_layers_return_the_input_dtype_whatever_the_compute_dtype():
    # A wrapped layer is a drop-in nn.Linear: the compute dtype changes rounding, never the output dtype
    # (otherwise rotary-upcast q/k and a 16-bit v reach attention in different dtypes).
    ids = batch()
    for use_dora in (False, True):
        model = make("llama")
        qlora.wrap(model, qlora.QLoraConfig(r=4, compute_dtype="bfloat16", use_dora=use_dora))
        perturb(model)
        for name, m in base.adapter_modules(model):
            x = torch.randn(3, m.in_features)
            assert m(x).dtype == torch.float32, name
            assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16, name
            with qlora.disabled(model):
                assert m(x).dtype == torch.float32, name
        out = logits(model, ids)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_tied_weight_is_refused_and_errors():
    with pytest.raises(TunelabError, match="lm_head shares its weight"):
        qlora.wrap(make("gemma"), qlora.QLoraConfig(target_modules=["q_proj", "lm_head"]))
    model = make("llama")
    qlora.wrap(model, qlora.QLoraConfig(r=4))
    with pytest.raises(TunelabError, match="already has an adapter"):
        qlora.wrap(model, qlora.QLoraConfig(r=4))
    with pytest.raises(TunelabError, match="no quantised"):
        qlora.export(make("llama"), None, "/nonexistent")
    assert get_method("qlora") is qlora


def test_run_config_sections():
    from tunelab.config import load_config

    cfg = load_config(None, ["method=qlora", "qlora.r=4", "qlora.use_dora=true", "qlora.compute_dtype=bfloat16"])
    assert cfg.method == "qlora" and cfg.qlora.use_dora and cfg.qlora.block_size == 64 and cfg.qlora.double_quant
    assert load_config(None, ["method=dora", "dora.r=2"]).dora.r == 2
    for bad, msg in [("qlora.block_size=63", "must be even"), ("qlora.compute_dtype=int8", "compute_dtype"),
                     ("dora.use_dora=true", "unknown key")]:
        with pytest.raises(TunelabError, match=msg):
            load_config(None, [bad])


def test_quant_settings_survive_export(tmp_path):
    ids = batch()
    model = make("llama")
    cfg = qlora.QLoraConfig(r=4, block_size=128, double_quant=False, target_modules=["q_proj", "v_proj"])
    qlora.wrap(model, cfg)
    perturb(model)
    qlora.export(model, cfg, tmp_path)
    back = make("llama")
    qlora.load(back, tmp_path)
    q = back.model.layers[0].self_attn.q_proj
    assert q.block_size == 128 and not q.double_quant and q.weight_nf4.numel() == 64 * 64 // 2
    assert q.weight_absmax.numel() == 64 * 64 // 128
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=0, rtol=0)
    assert nf4.storage_bytes(q.quant_state()) == q.quantized_bytes()


def test_reload_quantises_from_the_training_dtype(tmp_path):
    trained = make("llama").to(torch.bfloat16)  # e.g. trained on a GPU in bf16 ...
    cfg = qlora.QLoraConfig(r=4, target_modules=["q_proj"])
    qlora.wrap(trained, cfg)
    perturb(trained)
    qlora.export(trained, cfg, tmp_path)
    assert json.loads((tmp_path / qlora.QUANT_FILE).read_text())["quantized_from_dtype"] == "bfloat16"
    back = make("llama")  # ... and loaded in fp32 on a CPU to export
    qlora.load(back, tmp_path)
    a, b = trained.model.layers[0].self_attn.q_proj, back.model.layers[0].self_attn.q_proj
    for key, t in a.quant_state().items():
        assert torch.equal(t, b.quant_state()[key]), key  # the very codes the adapter was trained against
    assert b.compute_dtype == torch.float32 and b.base_dtype == torch.float32

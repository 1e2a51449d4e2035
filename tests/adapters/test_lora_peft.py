"""tunelab LoRA ≡ PEFT 0.21 (the test-only oracle): same weights give the same logits, both file directions."""

import json
import warnings

import pytest
import torch
from adapter_helpers import batch, logits, make, perturb

peft = pytest.importorskip("peft")
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402

from tunelab.adapters import lora, peft_format  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("arch,rslora", [("llama", False), ("llama", True), ("phi3", False)])
def test_forward_matches_peft_with_copied_weights(arch, rslora):
    ids = batch()
    ours = make(arch)
    cfg = lora.LoraConfig(r=4, alpha=8, use_rslora=rslora)
    report = lora.wrap(ours, cfg)
    perturb(ours)

    theirs = get_peft_model(make(arch), PeftLoraConfig(r=4, lora_alpha=8, use_rslora=rslora,
                                                      target_modules=report.replaced))
    result = set_peft_model_state_dict(theirs, peft_format.peft_state_dict(ours))
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)
    # and the update is not trivially zero
    assert (logits(ours, ids) - logits(make(arch), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("arch,rslora,extras", [
    ("llama", False, []),
    ("llama", True, ["lm_head"]),
    ("llama", False, ["embed_tokens", "lm_head"]),
    ("gemma", False, ["lm_head"]),          # tied: training lm_head trains the shared embedding
    ("gemma", True, ["embed_tokens"]),
])
def test_export_loads_in_peft(tmp_path, arch, rslora, extras):
    ids = batch()
    ours = make(arch)
    cfg = lora.LoraConfig(r=4, alpha=16, use_rslora=rslora, modules_to_save=extras)
    lora.wrap(ours, cfg)
    perturb(ours)
    lora.export(ours, cfg, tmp_path)

    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["use_rslora"] == rslora
    theirs = PeftModel.from_pretrained(make(arch), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=ATOL, rtol=0)
    if arch == "gemma":
        assert conf["ensure_weight_tying"] is True
        inner = theirs.get_base_model()
        torch.testing.assert_close(inner.get_output_embeddings().weight, inner.get_input_embeddings().weight)


def _peft_model(arch, seed=3, **kw):
    model = get_peft_model(make(arch), PeftLoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # lora_A/B and the modules_to_save copies
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("llama", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 4})),
    ("qwen2", dict(r=4, lora_alpha=8, target_modules=r".*\.(q|o)_proj", modules_to_save=["lm_head"])),
    ("gemma", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),  # untied
    ("gemma", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                   ensure_weight_tying=True)),
])
def test_peft_saved_adapter_imports(tmp_path, arch, kw):
    ids = batch()
    theirs = _peft_model(arch, **kw)
    theirs.save_pretrained(tmp_path)
    ours = make(arch)
    report = peft_format.load_peft(ours, tmp_path)
    assert report.replaced
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)
    # disabling gives the base model, as PEFT's disable_adapter does
    with lora.disabled(ours), theirs.disable_adapter():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)


def test_untied_import_unties_config(tmp_path):
    theirs = _peft_model("gemma", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    theirs.save_pretrained(tmp_path)
    ours = make("gemma")
    peft_format.load_peft(ours, tmp_path)
    assert ours.config.tie_word_embeddings is False
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight


def test_roundtrip_through_peft_files(tmp_path):
    ids = batch()
    ours = make("mistral")
    cfg = lora.LoraConfig(r=4, alpha=4, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2})
    lora.wrap(ours, cfg)
    perturb(ours)
    lora.export(ours, cfg, tmp_path)
    back = make("mistral")
    lora.load(back, tmp_path)
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), atol=0, rtol=0)
    assert back.model.layers[0].mlp.down_proj.r == 2


def _write(path, conf, tensors=None):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(conf))
    if tensors is not None:
        save_file(tensors, str(path / "adapter_model.safetensors"))


def test_import_errors(tmp_path):
    model = make("llama")
    with pytest.raises(TunelabError, match="no adapter_config.json"):
        peft_format.load_peft(model, tmp_path / "nothing")
    _write(tmp_path / "bin", {"peft_type": "LORA"})
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(TunelabError, match="pickle is not loaded"):
        peft_format.load_peft(model, tmp_path / "bin")
    _write(tmp_path / "ia3", {"peft_type": "IA3"}, {})
    with pytest.raises(TunelabError, match="peft_type 'IA3'"):
        peft_format.load_peft(model, tmp_path / "ia3")
    _write(tmp_path / "dora", {"peft_type": "LORA", "use_dora": True}, {})  # routed to DoRA, which finds no tensors
    with pytest.raises(TunelabError, match="no lora_A/lora_B tensors"):
        peft_format.load_peft(model, tmp_path / "dora")
    _write(tmp_path / "fifo", {"peft_type": "LORA", "fan_in_fan_out": True}, {})
    with pytest.raises(TunelabError, match="fan_in_fan_out"):
        peft_format.load_peft(model, tmp_path / "fifo")
    a = torch.zeros(4, 64)
    _write(tmp_path / "wrong", {"peft_type": "LORA", "r": 4},
           {"base_model.model.model.layers.0.self_attn.nope.lora_A.weight": a,
            "base_model.model.model.layers.0.self_attn.nope.lora_B.weight": torch.zeros(64, 4)})
    with pytest.raises(TunelabError, match="pattern 'model.layers.0.self_attn.nope' matches no module"):
        peft_format.load_peft(model, tmp_path / "wrong")


def test_reexport_after_import_needs_no_config(tmp_path):
    ids = batch()
    theirs = _peft_model("llama", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"v_proj": 2})
    theirs.save_pretrained(tmp_path / "a")
    ours = make("llama")
    lora.load(ours, tmp_path / "a")
    lora.export(ours, None, tmp_path / "b")
    conf = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["lora_dropout"]) == (4, 8, 0.1)
    again = PeftModel.from_pretrained(make("llama"), tmp_path / "b").eval()
    torch.testing.assert_close(logits(again, ids), logits(theirs, ids), atol=ATOL, rtol=0)


def test_embedding_lora_is_refused(tmp_path):
    theirs = _peft_model("llama", r=4, target_modules=["q_proj", "embed_tokens"])
    theirs.save_pretrained(tmp_path)
    with pytest.raises(TunelabError, match="lora_embedding_A"):
        peft_format.load_peft(make("llama"), tmp_path)

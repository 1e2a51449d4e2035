"""Architecture matrix: every tiny architecture trains with LoRA and survives save → load → merge.

What "all-linear" covers per architecture (transformers 5.23):
  llama/qwen2/mistral/gemma: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
  phi3:    qkv_proj o_proj gate_up_proj down_proj (fused projections are single nn.Linear layers)
  mixtral: q_proj k_proj v_proj o_proj only. The router `mlp.gate` is a MixtralTopKRouter and the experts
           are one fused `mlp.experts` module with 3D Parameters (gate_up_proj [E, 2I, H], down_proj
           [E, H, I]); neither is an nn.Linear. The experts can be trained fully via modules_to_save.
"""

import pytest
import torch
from adapter_helpers import batch, logits, make, train
from safetensors.torch import load_file, save_file

from tunelab.adapters import lora
from tunelab.models.tiny import ARCHS

EXPECTED = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},
}




@pytest.mark.parametrize("arch", ARCHS)
def test_arch_trains_and_roundtrips(arch, tmp_path):
    ids = batch(t=12)
    model = make(arch)
    cfg = lora.LoraConfig(r=4, alpha=8)
    report = lora.wrap(model, cfg)
    names = {n.rpartition(".")[2] for n in report.replaced}
    assert names == EXPECTED.get(arch, EXPECTED["llama"])
    assert len(report.replaced) == 2 * len(names)  # two decoder layers, nothing else (no lm_head)
    if arch == "mixtral":
        assert report.notes and "experts" in report.notes[0]

    losses = train(model, ids)
    assert losses[-1] < losses[0] - 0.25, losses  # falls clearly (random init: ~ln(128)=4.85)
    want = logits(model, ids)

    # our own format: adapter_state_dict -> safetensors -> fresh base
    save_file({k: v.contiguous() for k, v in lora.adapter_state_dict(model).items()}, str(tmp_path / "a.st"))
    again = make(arch)
    lora.wrap(again, cfg)
    lora.load_adapter_state_dict(again, load_file(str(tmp_path / "a.st")))
    torch.testing.assert_close(logits(again, ids), want, atol=0, rtol=0)

    # PEFT format
    lora.export(model, cfg, tmp_path / "peft")
    third = make(arch)
    lora.load(third, tmp_path / "peft")
    torch.testing.assert_close(logits(third, ids), want, atol=0, rtol=0)

    lora.merge(again)
    torch.testing.assert_close(logits(again, ids), want, atol=1e-5, rtol=0)


def test_mixtral_experts_as_extras(tmp_path):
    ids = batch(t=12)
    model = make("mixtral")
    cfg = lora.LoraConfig(r=4, modules_to_save=["experts"])
    report = lora.wrap(model, cfg)
    assert report.extras == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"] and not report.notes
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.requires_grad and experts.gate_up_proj.dim() == 3
    before = experts.gate_up_proj.detach().clone()
    losses = train(model, ids, steps=4)
    assert losses[-1] < losses[0]
    assert not torch.equal(experts.gate_up_proj, before)
    want = logits(model, ids)
    lora.export(model, cfg, tmp_path)
    back = make("mixtral")
    lora.load(back, tmp_path)
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)
    lora.merge(back)
    torch.testing.assert_close(logits(back, ids), want, atol=1e-5, rtol=0)

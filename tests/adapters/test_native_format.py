"""tunelab's own adapter format (native_format.py), written and read by one module for mora, loreft and freeze:
same header and files for all three, a round trip through export_method/load_method gives identical outputs,
and anything else in the folder is refused with a one-line error naming it."""

import json

import pytest
import torch
from adapter_helpers import batch, logits, make, perturb
from safetensors.torch import load_file

from tunelab.adapters import base, loreft, native_format
from tunelab.errors import TunelabError

CASES = {  # method -> (options, the method's own header fields)
    "mora": ({"r": 4, "type": "sharing", "target_modules": ["q_proj", "down_proj"], "modules_to_save": ["lm_head"]},
             {"config", "modules", "modules_to_save"}),
    "loreft": ({"r": 3, "layers": [1], "positions": "f2+l2"}, {"config", "hidden_size"}),
    "freeze": ({"layers": 1, "train_lm_head": True}, {"modules", "ensure_weight_tying"}),
}


def prompt_batch(ids, prompt_len=5):
    B, T = ids.shape
    loss = torch.zeros(B, T, dtype=torch.bool)
    loss[:, prompt_len:] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss,
            "position_ids": torch.arange(T).expand(B, T), "seq_ids": torch.zeros_like(ids)}


def scored(model, ids):
    with base.batch_context(model, prompt_batch(ids)):
        return logits(model, ids)


@pytest.mark.parametrize("method", sorted(CASES))
def test_roundtrip_through_one_format(method, tmp_path):
    options, fields = CASES[method]
    ids = batch(t=10)
    model = make("gemma")  # tied embeddings: a fully trained lm_head is written once
    base.apply_method(model, method, options)
    perturb(model)
    want = scored(model, ids)
    out = base.export_method(model, method, options, tmp_path / "ad", base_model_name_or_path="tiny-gemma")
    assert sorted(p.name for p in out.iterdir()) == sorted([native_format.CONFIG_FILE, native_format.WEIGHTS_FILE])
    meta, tensors = native_format.load_native(out, method)
    assert list(meta)[:4] == ["format", "version", "method", "base_model_name_or_path"]
    assert (meta["format"], meta["version"], meta["method"]) == ("tunelab-adapter", 1, method)
    assert meta["base_model_name_or_path"] == "tiny-gemma" and set(meta) - set(list(meta)[:4]) == fields
    raw = load_file(str(out / native_format.WEIGHTS_FILE))
    assert raw.keys() == tensors.keys() and all(t.device.type == "cpu" for t in raw.values())
    sd = base.adapter_state_dict(model)
    assert set(sd) <= set(tensors)
    for k, t in sd.items():
        assert torch.equal(tensors[k], t), k
    back = make("gemma")
    report = base.load_method(back, method, out)
    assert report.notes[-1].startswith("loaded tunelab")
    torch.testing.assert_close(scored(back, ids), want, atol=0, rtol=0)


def test_header_defaults_and_refusals(tmp_path):
    model = make("llama")
    loreft.wrap(model, {"r": 2})
    out = loreft.export(model, None, tmp_path / "a")  # the base name falls back to the model's own
    meta, _ = native_format.load_native(out, "loreft")
    assert meta["base_model_name_or_path"] == (model.config._name_or_path or None)
    with pytest.raises(TunelabError, match="holds a 'loreft' adapter, not mora"):
        native_format.load_native(out, "mora")
    with pytest.raises(TunelabError, match="not a tunelab freeze adapter folder"):
        base.load_method(make("llama"), "freeze", tmp_path / "missing")
    cfg_file = out / native_format.CONFIG_FILE
    cfg_file.write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(TunelabError, match="version 2"):
        native_format.load_native(out, "loreft")
    cfg_file.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(TunelabError, match="not a tunelab adapter header"):
        native_format.load_native(out, "loreft")
    cfg_file.write_text("{\n  oops")
    with pytest.raises(TunelabError, match=r"tunelab_adapter.json:2: invalid JSON") as e:
        native_format.load_native(out, "loreft")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="reserved"):
        native_format.save_native(tmp_path / "b", "mora", {"method": "lora"}, {})

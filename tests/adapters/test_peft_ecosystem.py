"""The run's adapter/ folder is what the ecosystem expects: PEFT (`PeftModel`, `AutoPeftModelForCausalLM`) loads
it as is — the base from `base_model_name_or_path` (a folder's absolute path, an alias's hub id), compact
`target_modules` selecting exactly the trained modules — and gives tunelab's logits."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from adapter_helpers import batch, logits, make, perturb

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.adapters import lora, peft_format
from tunelab.models.aliases import HUB_IDS

peft = pytest.importorskip("peft")

ATOL = 1e-5
LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _peft_targets(model) -> set[str]:
    """Module names PEFT put a LoRA layer on."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_run_adapter_loads_with_peft_and_auto_peft(tmp_path, tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tunelab.config import load_config
    from tunelab.export import export_merged, load_run
    from tunelab.train.launch import train

    monkeypatch.chdir(tmp_path)  # model.name is relative, as users write it: the adapter must not be
    save_tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16))
    cfg = load_config(write_config(
        tmp_path / "c.yaml", output_dir=str(tmp_path / "run"), method="lora", model={"name": "tiny"},
        data={"train": str(data), "max_length": 64, "eval_max": 2}, lora={"r": 4, "alpha": 8},
        train={"max_steps": 2, "batch_size": 4, "lr": 1e-2}, samples={"n_heldout": 0}))
    run = train(cfg)
    adapter = run / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["target_modules"] == LINEAR  # compact, as PEFT writes it, not 14 full paths
    assert conf["base_model_name_or_path"] == str((tmp_path / "tiny").resolve())
    assert Path(conf["base_model_name_or_path"]).is_absolute()

    ours, tok, _ = load_run(run, device="cpu")  # tunelab still loads its run (the base from config.yaml)
    ids = torch.tensor([tok("Add the numbers. 2 + 3 = 5. Done.")["input_ids"]])
    want = logits(ours, ids)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(run, tmp_path / "merged"), dtype=torch.float32)
    torch.testing.assert_close(logits(merged.eval(), ids), want, atol=ATOL, rtol=0)

    monkeypatch.chdir(tmp_path.parent)  # elsewhere: only the absolute path can find the base now
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32).eval()
    assert (logits(base, ids) - want).abs().max() > 1e-4  # the adapter does something
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert _peft_targets(theirs) == {n for n, _ in peft_format.base.adapter_modules(ours)}
    torch.testing.assert_close(logits(theirs, ids), want, atol=ATOL, rtol=0)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    torch.testing.assert_close(logits(auto, ids), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("targets,form", [
    ([r"model\.layers\.1\..*"], str),                                # one layer of two: a regex
    (["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"], list),    # no pattern: the full paths
    (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
])
def test_partial_selection_loads_in_peft(tmp_path, targets, form):
    ids = batch()
    folder = tmp_path / "base"
    make("llama").save_pretrained(folder)
    ours = make("llama")
    report = lora.wrap(ours, lora.LoraConfig(r=4, alpha=8, target_modules=targets))
    perturb(ours)
    lora.export(ours, None, tmp_path / "ad", base_model_name_or_path=str(folder))
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    written = conf["target_modules"]
    if form is str:
        assert isinstance(written, str) and "layers\\.1" in written
    elif form is list:
        assert written == sorted(report.replaced)
    else:
        assert written == form
    theirs = peft.PeftModel.from_pretrained(make("llama"), tmp_path / "ad").eval()
    assert _peft_targets(theirs) == set(report.replaced)
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=ATOL, rtol=0)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ad").eval()
    torch.testing.assert_close(logits(auto, ids), logits(ours, ids), atol=ATOL, rtol=0)


def test_compact_names_never_select_more_than_trained():
    # an extra module whose leaf name collides with a target: leaf names would over-select, so fall back
    model = make("llama")
    model.model.layers[0].mlp.add_module("extra", torch.nn.Sequential())
    model.model.layers[0].mlp.extra.add_module("q_proj", torch.nn.Linear(4, 4))
    report = lora.wrap(model, lora.LoraConfig(target_modules=[r"model\.layers\.\d\.self_attn\.q_proj"]))
    value = peft_format.target_modules_value(model, report.replaced)
    assert value != ["q_proj"]
    names = peft_format.base_module_names(model)
    assert peft_format._peft_selects(value, names) == set(report.replaced)
    assert "model.layers.0.self_attn.q_proj.lora_A" not in names  # adapter internals are not base modules


def test_ecosystem_ref(tmp_path, monkeypatch):
    from tunelab.models.load import ecosystem_ref

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    assert ecosystem_ref("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ecosystem_ref("m") == str(tmp_path / "m") and ecosystem_ref("./m/") == str(tmp_path / "m")
    assert ecosystem_ref("org/model") == "org/model" and ecosystem_ref("tiny-llama") == "tiny-llama"


_AUTO = """
import sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    out = model(input_ids=torch.load(sys.argv[2])).logits
torch.save({"logits": out, "base": model.get_base_model().config._name_or_path}, sys.argv[3])
"""


def test_alias_adapter_resolves_from_the_hub_cache_offline(tmp_path):
    """An alias run writes the hub id; AutoPeftModelForCausalLM finds it in an (offline) HF hub cache."""
    ids = batch()
    ours = make("llama")
    lora.wrap(ours, lora.LoraConfig(r=4, alpha=8))
    perturb(ours)
    adapter = lora.export(ours, None, tmp_path / "ad", base_model_name_or_path="smollm2-135m")
    conf = json.loads((adapter / "adapter_config.json").read_text())
    hub_id = conf["base_model_name_or_path"]
    assert hub_id == HUB_IDS["smollm2-135m"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert conf["target_modules"] == LINEAR

    # a hub cache holding that repo: models--org--name/{refs/main, snapshots/<sha>/...} — here a tiny model
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    make("llama").save_pretrained(repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "auto.py").write_text(_AUTO)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(tmp_path / "auto.py"), str(adapter), str(tmp_path / "ids.pt"),
                        str(tmp_path / "out.pt")], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["base"] == hub_id  # resolved offline from the cache: the logits are the snapshot's tiny model
    torch.testing.assert_close(out["logits"], logits(ours, ids), atol=ATOL, rtol=0)

"""End to end on the real SmolLM2-135M (offline GGUF → safetensors): train → PEFT load → merge → generate."""

import json

import pytest
import torch

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("it")
    data = write_jsonl(tmp / "d.jsonl", alpaca_rows(12))
    cfg = write_config(tmp / "c.yaml", output_dir=str(tmp / "run"), method="lora",
                       model={"name": "smollm2-135m"},
                       data={"train": str(data), "max_length": 96, "eval_max": 2, "eval_fraction": 0.2},
                       lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                       train={"max_steps": 2, "batch_size": 2, "lr": 1e-2},
                       samples={"n_heldout": 1, "max_new_tokens": 8})
    assert main(["train", str(cfg)]) == 0
    return tmp / "run"


def _logits(model, tok):
    enc = tok(["Add the numbers. 2 + 1"], return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def test_run_directory_contract(lora_run):
    for name in ("config.yaml", "metrics.jsonl", "results.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json", "adapter/chat_template.jinja"):
        assert (lora_run / name).exists(), name
    rows = [json.loads(x) for x in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert any("eval_loss" in r for r in rows)
    res = json.loads((lora_run / "results.json").read_text())
    assert res["steps"] == 2 and res["samples"] and "before" in res["samples"][0]
    # what PEFT/vLLM resolve: the alias's hub id, compact target names (tunelab itself reads config.yaml)
    conf = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert conf["target_modules"] == ["down_proj", "q_proj", "v_proj"]


def test_adapter_loads_in_peft_with_identical_logits(lora_run):
    peft = pytest.importorskip("peft")
    from tunelab.export import load_run
    from tunelab.models.load import load_model

    ours, tok, _ = load_run(lora_run, device="cpu")
    base, _ = load_model("smollm2-135m", device="cpu")
    theirs = peft.PeftModel.from_pretrained(base, str(lora_run / "adapter")).eval()
    a, b = _logits(ours, tok), _logits(theirs, tok)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    plain, _ = load_model("smollm2-135m", device="cpu")
    assert (a - _logits(plain, tok)).abs().max() > 1e-4  # the adapter changed something


def test_export_merged_loads_in_transformers(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.export import load_run

    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--merged", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ours, _, template = load_run(lora_run, device="cpu")
    assert torch.allclose(_logits(merged, tok), _logits(ours, tok), atol=1e-4)
    assert tok.chat_template == template.jinja


def test_generate_cli_uses_run(lora_run, capsys):
    assert main(["generate", str(lora_run), "--prompt", "Add the numbers. 2 + 3", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip()


def test_full_finetune_writes_hf_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "run"), method="full",
                       model={"name": str(model_dir)}, data={"train": str(data), "max_length": 64, "eval_fraction": 0.25},
                       train={"max_steps": 3, "batch_size": 2, "lr": 1e-3}, samples={"n_heldout": 0})
    assert main(["train", str(cfg)]) == 0
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    diff = max((p - q).abs().max() for p, q in zip(m.parameters(), base.parameters()))
    assert diff > 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["eval_loss_after"] < res["eval_loss_before"]

"""End to end through the run config: `method: dora | qlora` train, save the adapter, load the run, export merged.

Also checks that the example configs (examples/dora.yaml, examples/qlora.yaml) validate against the schema.
"""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("method,options", [("dora", {"r": 4}), ("qlora", {"r": 4, "use_dora": True})])
def test_run_save_load_export(tmp_path, tokenizer, method, options):
    from transformers import AutoModelForCausalLM

    from tunelab.adapters import base
    from tunelab.export import export_merged, load_run
    from tunelab.train.launch import train

    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(24))
    cfg = load_config(write_config(
        tmp_path / "c.yaml", output_dir=str(tmp_path / "run"), method=method, model={"name": str(model_dir)},
        data={"train": str(data), "max_length": 64, "eval_max": 4}, **{method: options},
        train={"max_steps": 3, "batch_size": 4, "lr": 5e-3}, samples={"n_heldout": 0}))
    run = train(cfg)
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and results["eval_loss_after"] < results["eval_loss_before"]
    adapter = run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    assert (adapter / "tunelab_quant.json").exists() == (method == "qlora")

    model, tok, _ = load_run(run, device="cpu")
    assert base.has_adapter(model)
    ids = torch.tensor([tok("1 + 2 = 3. Done.")["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out = export_merged(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["dora", "qlora"])
def test_example_configs_validate(name):
    cfg = load_config(ROOT / "examples" / f"{name}.yaml")
    assert cfg.method == name and cfg.model.name == "smollm2-135m"
    assert cfg.data.train.endswith("gsm_sft.jsonl") and Path(cfg.data.train).is_file()
    assert cfg.train.max_steps <= 20 and cfg.data.max_length <= 384

"""The run pipeline for mora / loreft / freeze: train → artifacts → load_run → generate/eval → export --merged."""

import json

import pytest

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.export import load_run
from tunelab.generate import generate
from tunelab.objectives.sft import SFT

OPTIONS = {"mora": {"r": 4, "type": "rotation"}, "loreft": {"r": 4, "positions": "f3+l3"},
           "freeze": {"layers": 1}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer)


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_run_saves_loads_and_exports(method, tmp_path, model_dir, capsys):
    from tunelab.objectives.scoring import eval_loss
    from tunelab.train.launch import train
    from tunelab.train.prepare import prepare

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(24))
    path = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "run"), method=method,
                        model={"name": str(model_dir)}, data={"train": str(data), "max_length": 96, "eval_max": 4},
                        train={"max_steps": 4, "batch_size": 4, "lr": 1e-2}, **{method: OPTIONS[method]},
                        samples={"n_heldout": 1, "max_new_tokens": 6})
    cfg = load_config(path)
    out = train(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["eval_loss_after"] < res["eval_loss_before"]
    assert (out / ("model" if method == "freeze" else "adapter")).is_dir()

    model, tok, template = load_run(out, device="cpu")
    # the reloaded run scores the held-out set exactly as the trained model did, and generates the same text
    p = prepare(cfg)
    loss = eval_loss(model, p.eval, tok.pad_token_id, objective=SFT())  # LoReFT: positions via batch_context
    assert loss == pytest.approx(res["eval_loss_after"], abs=1e-5)
    sample = res["samples"][0]
    assert generate(model, tok, [sample["prompt"]], max_new_tokens=6, stop=template.stop_strings) == [sample["after"]]

    capsys.readouterr()  # drop the training output
    rc = main(["export", str(out), "--merged", str(tmp_path / "merged")])
    err = capsys.readouterr().err.strip().splitlines()
    if method == "loreft":
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: loreft cannot be merged")
        assert not (tmp_path / "merged").exists()
        return
    assert rc == 0
    merged, tok2, _ = load_run(tmp_path / "merged", device="cpu")
    assert loss == pytest.approx(eval_loss(merged, p.eval, tok2.pad_token_id), abs=1e-4)
    assert not any(".mora_" in k for k in merged.state_dict())


"""One orchestrator for every objective: the drift between the old SFT and preference run paths is gone, and
a batch source's own state survives a checkpoint round trip."""

import json

import pytest

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.config import RunConfig, load_config
from tunelab.train.launch import train


def _task(tmp_path, name, rows, fmt):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nkind: perplexity\ndata: {data.name}\nformat: {fmt}\nmax_length: 64\n")
    return str(path)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def setup(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer)
    target = _task(tmp_path, "target_loss", alpaca_rows(6), "alpaca")
    sft_data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(24))
    pairs = [{"prompt": f"{i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(24)]
    pref_data = write_jsonl(tmp_path / "p.jsonl", pairs)

    def run(name, objective, data):
        cfg = write_config(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), method="lora",
                           objective=objective, model={"name": str(model_dir)},
                           data={"train": str(data), "max_length": 64, "eval_fraction": 0.2}, lora={"r": 4},
                           train={"max_steps": 4, "batch_size": 2, "lr": 1e-2, "eval_every": 2},
                           samples={"n_heldout": 1, "max_new_tokens": 4, "at_eval": True},
                           eval={"target": [target], "during_training": True})
        out = train(load_config(cfg))
        return out, json.loads((out / "results.json").read_text())

    return run, sft_data, pref_data


def test_dpo_run_writes_the_rows_an_sft_run_does(setup):
    run, sft_data, pref_data = setup
    (sft_out, sft_res), (dpo_out, dpo_res) = run("sft", "sft", sft_data), run("dpo", "dpo", pref_data)
    for out in (sft_out, dpo_out):
        evals = [r for r in _rows(out / "metrics.jsonl") if "target_loss/loss" in r]
        assert [r["step"] for r in evals] == [2, 4]  # eval.during_training: the task curve is in the log
        assert [r["step"] for r in _rows(out / "samples.jsonl")] == [2]  # samples.at_eval (final → results)
    dpo_eval = [r for r in _rows(dpo_out / "metrics.jsonl") if "target_loss/loss" in r]
    assert all("eval_pref_accuracy" in r for r in dpo_eval)  # and the objective's own held-out measures
    for res in (sft_res, dpo_res):  # preference results carry parameter counts too (sweep report columns)
        assert 0 < res["trainable_params"] < res["total_params"]
        assert res["samples"] and "before" in res["samples"][0]


def test_results_json_never_holds_nan(setup, tmp_path):
    run, _, pref_data = setup
    _, res = run("kto", "kto", write_jsonl(tmp_path / "u.jsonl", [
        {"prompt": f"{i}?", "completion": f"{i}.", "label": i % 2 == 0} for i in range(12)]))
    assert "NaN" not in (tmp_path / "kto" / "results.json").read_text()
    assert res["trainable_params"] > 0


class CountingSource:
    """A batch source with state of its own (as a rollout source has): how many batches it has served."""

    def __init__(self, batches):
        self.batches, self.per_epoch, self.served = batches, len(batches), 0

    def get(self, epoch, index):
        self.served += 1
        return self.batches[index]

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.served = state["served"]


def test_batch_source_state_survives_a_checkpoint_round_trip(tiny, tokenizer, tmp_path):
    from tunelab.data.collate import collate
    from tunelab.data.masking import encode_dataset
    from tunelab.data.formats import Sample
    from tunelab.data.templates import get_template
    from tunelab.objectives.sft import SFT
    from tunelab.train.loop import fit

    tmpl = get_template("chatml", tokenizer)
    samples = [Sample([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], None, "x")
               for i in range(6)]
    examples, _ = encode_dataset(tokenizer, samples, tmpl)
    batches = [collate(examples[k:k + 2], tokenizer.pad_token_id) for k in range(0, 6, 2)]
    cfg = RunConfig.model_validate({"train": {"max_steps": 4, "save_every": 2, "lr": 1e-3}}).train
    model = tiny("llama")
    first = CountingSource(batches)
    fit(model, SFT(), first, cfg, tmp_path, stop_after=2)
    assert first.served == 2
    resumed = CountingSource(batches)
    fit(model, SFT(), resumed, cfg, tmp_path)
    assert resumed.served == 4  # restored to 2 from the checkpoint, then two more steps

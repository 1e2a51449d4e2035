"""Learning/forgetting bookkeeping on hand-made numbers, and the on-disk base-result cache."""

import json

import pytest

from tunelab.eval import runner
from tunelab.eval.forgetting import EvalCache, learning_forgetting, model_fingerprint, run_results_fields, task_delta
from tunelab.eval.runner import results_table, run_tasks, save_results


def res(metric, value, hib):
    return {"metrics": {metric: value}, "primary": metric, "higher_is_better": {metric: hib}}


BASE = {"t_loss": res("loss", 2.0, False), "t_acc": res("acc", 0.2, True), "t_zero": res("exact_match", 0.0, True),
        "s_loss": res("loss", 3.0, False), "s_acc": res("acc", 0.5, True)}
TRAINED = {"t_loss": res("loss", 1.5, False), "t_acc": res("acc", 0.3, True), "t_zero": res("exact_match", 0.1, True),
           "s_loss": res("loss", 3.3, False), "s_acc": res("acc", 0.45, True)}


def test_sign_conventions_per_task():
    d = task_delta(BASE["t_loss"], TRAINED["t_loss"])
    assert d["change"] == pytest.approx(-0.5) and d["improvement"] == pytest.approx(0.5)  # lower loss = better
    assert d["relative"] == pytest.approx(0.25)
    d = task_delta(BASE["s_acc"], TRAINED["s_acc"])
    assert d["change"] == pytest.approx(-0.05) and d["improvement"] == pytest.approx(-0.05)
    assert d["relative"] == pytest.approx(-0.1)
    assert task_delta(BASE["t_zero"], TRAINED["t_zero"])["relative"] is None
    # Without an explicit direction, loss-type names are lower-is-better.
    assert task_delta({"metrics": {"perplexity": 10.0}}, {"metrics": {"perplexity": 8.0}})["improvement"] == 2.0


def test_learning_and_forgetting():
    out = learning_forgetting(BASE, TRAINED, target=["t_loss", "t_acc", "t_zero"], source=["s_loss", "s_acc"])
    # target: loss 2.0→1.5 (+25%), acc 0.2→0.3 (+50%); t_zero has no relative change → mean 0.375.
    assert out["learning"] == pytest.approx(0.375)
    # source: loss 3.0→3.3 (−10%), acc 0.5→0.45 (−10%) → forgetting +0.10 (positive = got worse).
    assert out["forgetting"] == pytest.approx(0.10)
    assert out["target"]["t_zero"]["improvement"] == pytest.approx(0.1)
    assert learning_forgetting(BASE, BASE, ["t_acc"], ["s_acc"])["forgetting"] == 0
    fields = run_results_fields(BASE, TRAINED, ["t_loss", "t_acc"], ["s_acc"])
    assert fields["learning_score"] == pytest.approx(0.375) and fields["forgetting_score"] == pytest.approx(0.1)
    assert fields["eval"]["final"]["s_acc"] == {"acc": 0.45} and set(fields["forgetting"]) == {"s_acc"}
    with pytest.raises(KeyError, match="nope"):
        learning_forgetting(BASE, TRAINED, ["nope"], [])


def test_table_and_json(tmp_path):
    table = results_table(TRAINED, base=BASE)
    assert table.row_count == len(TRAINED)
    path = save_results(TRAINED, tmp_path / "r.json", model="m")
    assert json.loads(path.read_text())["tasks"]["t_acc"]["metrics"]["acc"] == 0.3


def test_base_results_cache(tokenizer, tiny, make_task, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    cache = EvalCache()
    assert cache.root == tmp_path / "cache" / "eval"
    task = make_task([{"text": "Hello there."}, {"text": "General Kenobi."}], kind="perplexity", format="text")
    calls = []
    real = runner._evaluate
    monkeypatch.setattr(runner, "_evaluate", lambda *a: calls.append(a[3].name) or real(*a))
    model = tiny("llama")
    key = model_fingerprint("tiny-llama-test", "float32")
    kw = dict(cache=cache, model_key=key, verbose=False)
    first = run_tasks(model, tokenizer, "chatml", [task], **kw)[task.name]
    second = run_tasks(model, tokenizer, "chatml", [task], **kw)[task.name]
    assert len(calls) == 1 and first["cached"] is False and second["cached"] is True
    assert second["metrics"] == first["metrics"]
    run_tasks(model, tokenizer, "chatml", [task], limit=1, **kw)  # another limit: another key
    run_tasks(model, tokenizer, "chatml", [task], cache=cache, model_key="other-model", verbose=False)
    assert len(calls) == 3
    task.data_path.write_text('{"text": "Edited."}\n')  # edited data: the task hash changes
    run_tasks(model, tokenizer, "chatml", [task], **kw)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="model_key"):
        run_tasks(model, tokenizer, "chatml", [task], cache=cache, verbose=False)


def test_model_fingerprint_tracks_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    a = model_fingerprint(str(tmp_path))
    assert model_fingerprint(str(tmp_path)) == a and model_fingerprint(str(tmp_path), "bf16") != a
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert model_fingerprint(str(tmp_path)) != a

"""`tunelab compare` end to end on a tiny model: variants train, one fails without stopping the sweep, the
report is written, and a rerun — after completion or after a kill mid-variant — redoes no finished work."""

import csv
import json

import pytest
import yaml

from tests.helpers import alpaca_rows, save_tiny_model, write_jsonl
from tunelab.cli import main
from tunelab.lab.compare import run_status, run_sweep
from tunelab.lab.sweep import load_sweep


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("lab")
    data = write_jsonl(tmp / "d.jsonl", alpaca_rows(12))
    # two tiny tasks: the training task's loss (target) and plain-text loss (source)
    write_jsonl(tmp / "prose.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."},
                                      {"text": "It was the best of times, it was the worst of times."}])
    (tmp / "target.yaml").write_text("kind: perplexity\ndata: d.jsonl\nformat: alpaca\nlimit: 3\n")
    (tmp / "source.yaml").write_text("kind: perplexity\ndata: prose.jsonl\nformat: text\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_CACHE", str(tmp / "cache"))  # the base-model eval cache stays out of ~/.cache
        yield save_tiny_model(tmp / "tiny", tokenizer), data, tmp


def write_sweep(path, model, data, out, **extra):
    sweep = {"name": "tiny-sweep", "description": "LoRA vs DoRA on a tiny model", "output_dir": str(out),
             "base": {"model": {"name": str(model)},
                      "data": {"train": str(data), "max_length": 64, "eval_fraction": 0.25},
                      "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "eval_every": 1, "save_every": 1},
                      "samples": {"n_heldout": 1, "max_new_tokens": 4, "at_eval": False},
                      "eval": {"target": [str(data.parent / "target.yaml")],
                               "source": [str(data.parent / "source.yaml")]}},
             "overrides": {"lora.r": 2, "dora.r": 2}, **extra}
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def sweep(assets):
    model, data, tmp = assets
    path = write_sweep(tmp / "sweep.yaml", model, data, tmp / "out", grid={"method": ["lora", "dora"]},
                       variants=[{"name": "broken", "overrides": {"method": "lora",
                                                                  "lora.target_modules": ["nomatch_proj"]}},
                                 {}])
    code = main(["compare", str(path)])
    return path, tmp / "out", code


def test_sweep_trains_variants_and_writes_report(sweep):
    path, out, code = sweep
    assert code == 1  # one variant failed; the others still trained
    state = json.loads((out / "sweep.json").read_text())
    status = {v["name"]: v["status"] for v in state["variants"]}
    assert status == {"broken,method=lora": "failed", "broken,method=dora": "done", "method=lora": "done",
                      "method=dora": "done"}  # dora has no lora.target_modules: the pattern cannot break it
    assert "nomatch_proj" in state["variants"][0]["error"]
    for folder in ("method-lora", "method-dora"):  # the variants' shell-safe folder names
        assert run_status(out / "runs" / folder) == "done"
        assert (out / "configs" / f"{folder}.yaml").exists()
    report = out / "report"
    for f in ("index.html", "results.md", "results.csv", "curves.png", "params.png"):
        assert (report / f).stat().st_size > 0, f
    rows = {r["variant"]: r for r in csv.DictReader((report / "results.csv").open())}
    assert rows["method=lora"]["method"] == "lora" and rows["method=dora"]["method"] == "dora"
    assert int(rows["method=dora"]["trainable_params"]) > int(rows["method=lora"]["trainable_params"])
    assert float(rows["method=lora"]["eval_loss_after"]) < float(rows["method=lora"]["eval_loss_before"])
    assert rows["method=lora"]["learning_from"] == "tasks"  # from the target task, not the held-out loss
    for name in ("method=lora", "method=dora"):
        for key in ("learning", "forgetting", "learn:target", "forget:source", "base:target:loss",
                    "final:source:loss"):
            assert rows[name][key] != "", (name, key)
    assert float(rows["method=lora"]["learning"]) > 0  # 2 steps at lr 1e-3 lower the training task's loss
    assert (report / "learning_forgetting.png").exists()
    assert rows["broken,method=lora"]["status"] == "failed"
    page = (report / "index.html").read_text()
    assert "<h1>tiny-sweep</h1>" in page and "matches no module" in page and "before</p>" in page
    # `tunelab report` on the sweep folder rebuilds the same table
    assert main(["report", str(out), "--out", str(out / "again")]) == 0
    assert (out / "again" / "results.md").read_text() == (report / "results.md").read_text()


def test_rerun_redoes_no_finished_variant(sweep):
    path, out, _ = sweep
    finished = {d.name: (d / "results.json").stat().st_mtime_ns for d in (out / "runs").iterdir()
                if (d / "results.json").exists()}
    calls = []
    run_sweep(load_sweep(path), runner=lambda cfg: calls.append(cfg.output_dir), report=False)
    assert [c.split("/")[-1] for c in calls] == ["broken_method-lora"]  # only the failed variant is retried
    assert finished == {d: (out / "runs" / d / "results.json").stat().st_mtime_ns for d in finished}


def test_dry_run_trains_nothing_and_flags_changed_configs(sweep, capsys):
    path, out, _ = sweep
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert main(["compare", str(path), "train.lr=0.5", "--dry-run"]) == 0
    text = " ".join(capsys.readouterr().err.split())
    assert "config changed!" in text and "method=dora" in text
    recorded = {v["status"] for v in json.loads((out / "sweep.json").read_text())["variants"]}
    assert "planned" not in recorded  # a dry run keeps the record of what happened before
    # a dry run writes nothing (not even the changed configs or sweep.json) and says what a real run would write
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before
    assert "dry run: nothing written" in text and "method-dora.yaml" in text and "sweep.json" in text


def test_config_errors_stop_the_sweep_before_training(assets, tmp_path, capsys):
    model, data, _ = assets
    path = write_sweep(tmp_path / "s.yaml", model, data, tmp_path / "out", grid={"train.lrr": [1]})
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: variant 'train.lrr=1': " in err and "train.lrr: unknown key" in err
    assert not (tmp_path / "out" / "runs").exists()


def test_killed_sweep_resumes_where_it_stopped(assets, tmp_path):
    from tunelab.train.launch import train

    model, data, _ = assets
    path = write_sweep(tmp_path / "s.yaml", model, data, tmp_path / "out", grid={"method": ["lora", "dora"]})
    sweep = load_sweep(path)

    def killed_in_second(cfg):  # variant 1 finishes; variant 2 is killed after its first step's checkpoint
        if cfg.method == "dora":
            train(cfg, stop_after=1)
            raise KeyboardInterrupt
        return train(cfg)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, runner=killed_in_second, report=False)
    first, second = (v.run_dir for v in sweep.variants)
    assert run_status(first) == "done" and run_status(second) == "partial"
    done_at = (first / "results.json").stat().st_mtime_ns
    calls = []

    def counting(cfg):
        calls.append(cfg.method)
        return train(cfg)

    outcomes = run_sweep(load_sweep(path), runner=counting)
    assert calls == ["dora"] and [o.status for o in outcomes] == ["skipped", "done"]
    assert (first / "results.json").stat().st_mtime_ns == done_at
    rows = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # resumed at step 2, no step trained twice
    assert (tmp_path / "out" / "report" / "index.html").exists()

"""A study end to end on a tiny model: seeds, per-item results, budgets, provenance, claims, the generated README
block, and the refusals (mismatched budgets, claims naming unknown variants or tasks)."""

import hashlib
import json

import pytest
import yaml

from tests.helpers import alpaca_rows, save_tiny_model, write_jsonl
from tunelab.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("study")
    data = write_jsonl(tmp / "d.jsonl", alpaca_rows(12))
    write_jsonl(tmp / "prose.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."},
                                      {"text": "It was the best of times, it was the worst of times."},
                                      {"text": "Call me Ishmael. Some years ago, never mind how long."}])
    (tmp / "target.yaml").write_text("kind: perplexity\ndata: d.jsonl\nformat: alpaca\nlimit: 4\n")
    (tmp / "prose.yaml").write_text("kind: perplexity\ndata: prose.jsonl\nformat: text\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_CACHE", str(tmp / "cache"))
        yield save_tiny_model(tmp / "tiny", tokenizer), data, tmp


def write_study(path, model, data, out, variants, **extra):
    study = {"name": "tiny-study", "description": "trained vs barely trained", "output_dir": str(out),
             "base": {"model": {"name": str(model)}, "lora": {"r": 2},
                      "data": {"train": str(data), "max_length": 64, "eval_fraction": 0.25},
                      "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "eval_every": None,
                                "save_every": None},
                      "samples": {"n_heldout": 0, "at_eval": False},
                      "eval": {"target": [str(data.parent / "target.yaml")],
                               "source": [str(data.parent / "prose.yaml")]}},
             "variants": variants, **extra}
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


VARIANTS = [{"name": "trained", "overrides": {"train.lr": 1e-2}},
            {"name": "untrained", "overrides": {"train.lr": 1e-9}}]
CLAIMS = [{"better": "trained", "than": "untrained", "on": "target", "expected": "training lowers the loss"},
          {"better": "untrained", "than": "trained", "on": "prose", "direction": "lower"}]


@pytest.fixture(scope="module")
def study(assets):
    model, data, tmp = assets
    path = write_study(tmp / "study.yaml", model, data, tmp / "out", VARIANTS, seeds=2, claims=CLAIMS,
                       match=["steps", "completions_sampled"])
    return path, tmp / "out", main(["compare", str(path)])


def test_every_variant_runs_once_per_seed(study):
    path, out, code = study
    assert code == 0
    for v in ("trained", "untrained"):
        for seed in (0, 1):
            run = out / "runs" / v / f"seed-{seed}"
            assert (run / "results.json").exists()
            assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == seed
    # the seed drives the data order: the first training step sees other rows
    first = [json.loads((out / "runs" / "trained" / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()[0])
             for s in (0, 1)]
    assert first[0]["loss"] != first[1]["loss"]
    state = json.loads((out / "sweep.json").read_text())
    assert {(v["variant"], v["seed"]) for v in state["variants"]} == {(a, s) for a in ("trained", "untrained")
                                                                      for s in (0, 1)}
    assert state["configured_budgets"]["trained"]["steps"] == 2 and state["match"] == ["steps", "completions_sampled"]


def test_per_item_results_pair_across_runs(study):
    _, out, _ = study
    rows = {}
    for v in ("trained", "untrained"):
        for s in (0, 1):
            rows[v, s] = [json.loads(x) for x in
                          (out / "runs" / v / f"seed-{s}" / "eval" / "target.items.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows["trained", 0] if r["phase"] == "after"]
    assert len(ids) == 4 and all(i.startswith("target:") for i in ids)
    for key, rs in rows.items():  # the same items in every run, before and after
        assert [r["id"] for r in rs if r["phase"] == "before"] == ids == [r["id"] for r in rs if r["phase"] == "after"]
    # a document's score is its mean token loss: training at lr 1e-2 lowers it, lr 1e-9 leaves it
    after = {r["id"]: r["score"] for r in rows["trained", 0] if r["phase"] == "after"}
    before = {r["id"]: r["score"] for r in rows["trained", 0] if r["phase"] == "before"}
    assert all(after[i] < before[i] for i in ids)
    res = json.loads((out / "runs" / "trained" / "seed-0" / "results.json").read_text())
    loss = res["eval"]["final"]["target"]["loss"]  # token-weighted: Σ nll / Σ tokens of the per-item rows
    items = [r for r in rows["trained", 0] if r["phase"] == "after"]
    assert loss == pytest.approx(sum(r["nll"] for r in items) / sum(r["tokens"] for r in items), rel=1e-6)


def test_budget_and_provenance_are_recorded(study):
    _, out, _ = study
    run = out / "runs" / "trained" / "seed-0"
    res = json.loads((run / "results.json").read_text())
    b = res["budget"]
    assert b["steps"] == 2 and b["sequences_trained"] == 4 and b["tokens_trained"] == res["train_tokens"] > 0
    assert b["completions_sampled"] == 0 and b["tokens_sampled"] == 0 and b["reward_model_calls"] == 0
    n, nt = res["total_params"], res["trainable_params"]
    assert b["flops_train"] == pytest.approx(res["train_tokens"] * (4 * n + 2 * nt))
    assert b["wall_seconds"] > 0 and b["cpu_seconds"] > 0 and b["peak_rss_mb"] > 10
    p = res["provenance"]
    assert p["tunelab"] and p["versions"]["torch"] and isinstance(p["machine"]["cpu_flags"], list)
    assert p["machine"]["cores"] >= 1 and p["machine"]["torch_cpu_capability"]
    assert p["hashes"]["config.yaml"] == hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    assert p["hashes"]["data.train"] == hashlib.sha256((out.parent / "d.jsonl").read_bytes()).hexdigest()
    assert len(p["hashes"]["task:target"]) == 16


def test_report_shows_claims_budgets_and_provenance(study, capsys):
    path, out, _ = study
    md = (out / "report" / "results.md").read_text()
    assert "trained > untrained on target ↓" in md and "training lowers the loss" in md
    assert "untrained > trained on prose ↓" in md
    assert "Provenance: tunelab" in md and "| trained | 2 | 2 |" in md  # budget table: 2 seeds, 2 steps
    assert "steps (configured) | completions sampled (configured) |" in md and "min wall" in md
    page = (out / "report" / "index.html").read_text()
    assert "<h2>Claims</h2>" in page and "<h2>Budgets</h2>" in page
    # 4 items × 2 seeds cannot reach p < .05 (the exact sign-flip test's smallest p is 2/16): honest inconclusive
    from tunelab.lab.claims import evaluate_claims
    from tunelab.lab.results import collect

    rows = evaluate_claims(collect([out]), CLAIMS)
    assert [r["outcome"] for r in rows] == ["inconclusive", "inconclusive"]
    assert rows[0]["diff"] > 0 and rows[0]["n_items"] == 4 and rows[0]["n_seeds"] == 2 and rows[0]["p"] >= 0.125
    assert rows[0]["mdd"] == float("inf") and rows[0]["per_seed"][0] > 0  # 4 items: nothing is detectable
    assert "∞ (too few items)" in md


def test_a_claims_declared_margin_reaches_its_verdict_and_text(study):
    _, out, _ = study
    from tunelab.lab.claims import evaluate_claims
    from tunelab.lab.results import collect
    from tunelab.lab.study import claim_line, claims_markdown

    wide = dict(CLAIMS[0], margin=100.0)  # every loss difference of a 2-step run is far below 100 nats
    rows = evaluate_claims(collect([out]), [wide, CLAIMS[1]])
    assert rows[0]["outcome"] == "negligible" and rows[0]["margin"] == 100.0 and not rows[0]["below_margin"]
    assert -100 < rows[0]["eq_low"] <= rows[0]["eq_high"] < 100 and rows[1]["outcome"] == "inconclusive"
    assert "trained > untrained on target ↓ (margin 100)" in claim_line(rows[0])
    assert claim_line(rows[0]).endswith("→ negligible (|Δ| < 100)")
    assert "**negligible (\\|Δ\\| < 100)**" in claims_markdown(rows)  # a table cell escapes its bars
    from tunelab.lab.study import study_html, study_markdown, study_parts

    runs = collect([out])
    assert "smallest Δ that matters" in study_markdown(runs, {"claims": [wide, CLAIMS[1]]}, "s")
    assert "smallest Δ that matters" not in study_markdown(runs, {"claims": CLAIMS}, "s")  # said only when used
    page = study_html(study_parts(runs, {"claims": [wide, CLAIMS[1]]}))
    assert "negligible (|Δ| &lt; 100)" in page and "inside it is negligible" in page


def test_markdown_block_regenerates_the_readme_section(study, tmp_path, capsys):
    _, out, _ = study
    readme = tmp_path / "README.md"
    readme.write_text("# intro\n\n<!-- study:tiny-study -->\nold hand-written verdict\n<!-- /study:tiny-study -->\n"
                      "after\n")
    assert main(["report", str(out), "--markdown", str(readme)]) == 0
    text = readme.read_text()
    assert "old hand-written" not in text and text.startswith("# intro\n") and text.endswith("after\n")
    assert "| claim (paper's direction) |" in text and "**inconclusive**" in text
    assert main(["report", str(out), "--markdown"]) == 0
    assert "<!-- study:tiny-study -->" in capsys.readouterr().out
    other = tmp_path / "OTHER.md"
    other.write_text("no markers\n")
    assert main(["report", str(out), "--markdown", str(other)]) == 2
    assert "markers" in capsys.readouterr().err and other.read_text() == "no markers\n"


def test_mismatched_budgets_are_refused_before_training(assets, tmp_path, capsys):
    model, data, _ = assets
    variants = [{"name": "short", "overrides": {"train.max_steps": 2}},
                {"name": "long", "overrides": {"train.max_steps": 3}}]
    path = write_study(tmp_path / "s.yaml", model, data, tmp_path / "out", variants, match=["steps"])
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "match: steps" in err and "'short' 2 vs 'long' 3" in err
    assert not (tmp_path / "out" / "runs").exists()
    # within 5 %: accepted (a dry run, nothing trains)
    variants[1]["overrides"]["train.max_steps"] = 2
    write_study(path, model, data, tmp_path / "out", variants, match=["steps"], seeds=[3, 5])
    assert main(["compare", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().err
    assert "2 variants × 2 seeds" in text and "4 runs" in text and not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("claim, culprit", [
    ({"better": "nope", "than": "trained", "on": "target"}, "unknown variant 'nope'"),
    ({"better": "trained", "than": "untrained", "on": "gsm"}, "does not evaluate task 'gsm'"),
    ({"better": "trained", "than": "untrained", "on": "target", "margin": 0}, "margin")])
def test_claims_name_known_variants_and_tasks(assets, tmp_path, capsys, claim, culprit):
    model, data, _ = assets
    path = write_study(tmp_path / "s.yaml", model, data, tmp_path / "out", VARIANTS, claims=[CLAIMS[0], claim])
    assert main(["compare", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1
    text = path.read_text().splitlines()
    lines = [i for i, t in enumerate(text, 1) if t.startswith("- better:")]
    if "margin" in claim:  # a key's own error names the key's line, inside the second claim
        lines[1] = next(i for i, t in enumerate(text, 1) if t.strip().startswith("margin:"))
    assert err.startswith(f"error: {path}:{lines[1]}: "), (err, lines)  # the second claim's line


def test_overwrite_clears_a_previous_runs_item_files(tmp_path):
    """eval/ is the run's own (per-item scores): `overwrite` clears it like results.json, never refusing."""
    from tunelab.train.rundir import claim_run_dir

    out = tmp_path / "run"
    with claim_run_dir(out, False, False):  # a folder tunelab marked as its run
        pass
    (out / "eval").mkdir(parents=True)
    (out / "config.yaml").write_text("method: lora\n")
    (out / "results.json").write_text("{}")
    (out / "eval" / "t.items.jsonl").write_text('{"id": "t:0:abc", "score": 1}\n')
    with claim_run_dir(out, True, False):
        assert not (out / "eval").exists() and not (out / "results.json").exists()


def test_a_study_runs_in_parts(assets, tmp_path, capsys):
    """--seeds / --only train part of a study now; the rest keeps its state, the report covers what finished."""
    model, data, _ = assets
    path = write_study(tmp_path / "s.yaml", model, data, tmp_path / "out", VARIANTS, seeds=2, claims=CLAIMS[:1])
    assert main(["compare", str(path), "--seeds", "0", "--only", "trained"]) == 0
    runs = tmp_path / "out" / "runs"
    assert (runs / "trained" / "seed-0" / "results.json").exists()
    assert not (runs / "trained" / "seed-1").exists() and not (runs / "untrained").exists()
    state = {v["name"]: v["status"] for v in json.loads((tmp_path / "out" / "sweep.json").read_text())["variants"]}
    assert state == {"trained/seed-0": "done", "trained/seed-1": "planned", "untrained/seed-0": "planned",
                     "untrained/seed-1": "planned"}
    assert "→ not run" in capsys.readouterr().out  # the claim needs both variants
    assert main(["compare", str(path), "--seeds", "7"]) == 2
    assert "--seeds: 7 is not one of the study's seeds (0, 1)" in capsys.readouterr().err
    assert main(["compare", str(path), "--only", "nope"]) == 2
    assert "--only: no variant named 'nope'" in capsys.readouterr().err


def test_the_seed_drives_adapter_init(assets):
    """train.seed reaches the adapter's random init (data order: test_every_variant_runs_once_per_seed; dropout and
    sampling draw from the generators run.py / rl.rollout seed from it)."""
    from tunelab.config import RunConfig
    from tunelab.train.prepare import prepare

    model, data, _ = assets

    def lora_a(seed):
        cfg = RunConfig.model_validate({"model": {"name": str(model)}, "lora": {"r": 2},
                                        "data": {"train": str(data), "max_length": 64}, "train": {"seed": seed}})
        p = prepare(cfg)
        return next(t.detach().clone() for n, t in p.model.named_parameters() if "lora_A" in n or "lora_a" in n)

    a0, a1, again = lora_a(0), lora_a(1), lora_a(0)
    assert not a0.equal(a1) and a0.equal(again)


def test_runs_from_different_machines_are_flagged(study, tmp_path, capsys):
    import shutil

    from tunelab.lab.compare import print_verdicts
    from tunelab.lab.study import study_markdown
    from tunelab.lab.results import collect
    from tunelab.lab.sweep import load_sweep

    path, out, _ = study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    runs = collect([copy])
    assert "Warning" not in study_markdown(runs, None, "x")  # one machine, one version: no warning
    res_path = copy / "runs" / "untrained" / "seed-1" / "results.json"
    res = json.loads(res_path.read_text())
    res["provenance"]["machine"]["cpu"] = "Another CPU"
    res_path.write_text(json.dumps(res))
    assert "**Warning:** runs of this study came from 2 different versions/machines" in \
        study_markdown(collect([copy]), None, "x")
    sweep = load_sweep(path)
    sweep.output_dir = copy
    print_verdicts(sweep)
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("warning: runs of this study came from 2 different") for line in printed) == 1
    assert sum(line.startswith("claim: ") for line in printed) == 2

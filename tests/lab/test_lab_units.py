"""Sweep files, variant naming, learning/forgetting bookkeeping and the Pareto front — no training."""

import re
import pytest

from tunelab.errors import TunelabError
from tunelab.lab.compare import config_drift
from tunelab.lab.plots import pareto_front
from tunelab.lab.results import delta_value, scores
from tunelab.lab.sweep import load_sweep, safe_dirname, set_dotted, variant_name


def test_pareto_front_hand_made_points():
    # (learning, forgetting): maximise learning, minimise forgetting
    pts = [(0.30, 0.10),   # 0 front: most learning
           (0.10, 0.01),   # 1 front: least forgetting
           (0.20, 0.05),   # 2 front: in between
           (0.15, 0.06),   # 3 dominated by 2 (learns less, forgets more)
           (0.30, 0.20),   # 4 dominated by 0 (same learning, more forgetting)
           (None, 0.0),    # 5 unknown learning: ignored
           (0.10, 0.01)]   # 6 identical to 1: neither dominates the other
    assert pareto_front(pts) == [1, 6, 2, 0]  # ordered by forgetting
    assert pareto_front([]) == []
    assert pareto_front([(0.1, float("nan"))]) == []
    assert pareto_front([(-0.2, 0.3)]) == [0]  # a lone point is its own front, however bad


def test_variant_names_and_dotted_overrides():
    assert variant_name({"method": "lora", "lora.r": 8}) == "method=lora,lora.r=8"
    assert variant_name({"train.lr": 1e-4, "data.train": "/x/y/code.jsonl", "x": [1, 2], "b": True}) == \
        "train.lr=0.0001,data.train=code,x=[1+2],b=true"
    assert safe_dirname("a/b c=1") == "a_b_c-1"
    # a folder name is safe in a shell: nothing outside [A-Za-z0-9._-], no leading '-' or '.'
    for label in ("method=lora,lora.r=8", "x=[1+2],b={c=d}", "-rf *; $(id) `x` 'q' \"q\" a|b&c>d<e", "..hidden"):
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", safe_dirname(label)), safe_dirname(label)
    assert safe_dirname("method=lora,lora.r=8") == "method-lora_lora.r-8"
    raw = {"train": {"lr": 1.0, "epochs": 2}}
    set_dotted(raw, "train.lr", 2.0)
    set_dotted(raw, "lora", {"r": 4, "alpha": 8})
    set_dotted(raw, "lora", {"r": 16})  # a mapping merges into the section
    assert raw == {"train": {"lr": 2.0, "epochs": 2}, "lora": {"r": 16, "alpha": 8}}
    with pytest.raises(TunelabError, match="not a section"):
        set_dotted(raw, "train.lr.x", 1)


def test_sweep_expansion_base_file_and_scale(tmp_path):
    (tmp_path / "studies").mkdir()
    (tmp_path / "base.yaml").write_text("method: lora\ntrain: {lr: 1.0e-3, max_steps: 5}\n")
    sweep = tmp_path / "studies" / "s.yaml"
    sweep.write_text(
        "base: ../base.yaml\n"
        f"output_dir: {tmp_path}/out\n"
        "overrides: {data.train: '${SWEEP_DIR}/data/x.jsonl', train.max_steps: 7}\n"
        "grid: {lora.r: [4, 8], train.lr: [1e-4]}\n"
        "variants:\n  - name: full\n    overrides: {method: full}\n  - {}\n"
        "scale:\n  output_dir: big\n  overrides: {train.max_steps: 100}\n")
    s = load_sweep(sweep)
    assert s.name == "s" and [v.name for v in s.variants] == [
        "full,lora.r=4,train.lr=0.0001", "full,lora.r=8,train.lr=0.0001", "lora.r=4,train.lr=0.0001",
        "lora.r=8,train.lr=0.0001"]
    v = s.variants[0]
    assert v.raw["method"] == "full" and v.raw["lora"] == {"r": 4} and v.raw["train"] == {"lr": 1e-4, "max_steps": 7}
    assert v.raw["data"]["train"] == f"{(tmp_path / 'studies').resolve()}/data/x.jsonl"
    assert v.run_dir == tmp_path / "out" / "runs" / "full_lora.r-4_train.lr-0.0001"  # shell-safe folder name
    assert v.raw["output_dir"] == str(v.run_dir) and v.raw["overwrite"] is False
    big = load_sweep(sweep, ["model.name=other"], scale=True)
    assert str(big.output_dir) == "big" and big.variants[0].raw["train"]["max_steps"] == 100
    assert big.variants[0].raw["model"]["name"] == "other"


@pytest.mark.parametrize("text, message", [
    ("grid: {lora.r: [1]}\nbogus: 1\n", r"s\.yaml:2: bogus: unknown key"),
    ("variants: [{name: a}, {name: a}]\n", "both named 'a'"),
    ("output_dir: x\n", "nothing to compare"),
    ("base: nowhere.yaml\ngrid: {lora.r: [1]}\n", "base: run config not found"),
    ("grid: {lora.r: [1]}\n", "--scale given but the sweep has no `scale:`"),
])
def test_sweep_file_errors_are_one_line(tmp_path, text, message):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(TunelabError, match=message):
        load_sweep(p, scale="scale" in message)


def test_scores_read_eval_keys_and_fall_back_to_eval_loss():
    full = {"learning_score": 0.2, "forgetting_score": 0.05, "eval_loss_before": 2.0, "eval_loss_after": 1.0,
            "learning": {"gsm": {"metric": "exact_match", "relative": None, "improvement": 0.3},
                         "code": {"relative": 0.1, "improvement": 0.2}},
            "forgetting": {"prose": 0.05}, "eval": {"base": {"gsm": {"exact_match": 0.0}}, "final": {}}}
    s = scores(full)
    assert (s["learning"], s["forgetting"], s["learning_from"]) == (0.2, 0.05, "tasks")
    assert s["learn"] == {"gsm": 0.3, "code": 0.1} and s["forget"] == {"prose": 0.05}
    s = scores({"eval_loss_before": 2.0, "eval_loss_after": 1.5})
    assert (s["learning"], s["forgetting"], s["learning_from"]) == (0.25, None, "eval loss")
    assert scores(None)["learning"] is None and scores({"eval_loss_before": None})["learning"] is None
    assert delta_value(True) is None and delta_value({"relative": None}) is None and delta_value(-1) == -1.0


def test_config_drift_names_changed_keys(tmp_path):
    from tunelab.config import RunConfig, save_config

    cfg = RunConfig.model_validate({"output_dir": str(tmp_path), "train": {"lr": 1e-3}})
    save_config(cfg, tmp_path / "config.yaml")
    assert config_drift(tmp_path, cfg) == []
    assert config_drift(tmp_path, cfg.model_copy(update={"overwrite": True})) == []  # how, not what
    other = RunConfig.model_validate({"output_dir": str(tmp_path), "train": {"lr": 2e-3}})
    assert config_drift(tmp_path, other) == ["train.lr: 0.001 → 0.002"]
    assert config_drift(tmp_path / "nothing", other) == []


@pytest.mark.parametrize("study", ["lora_vs_full", "masking", "mora_vs_lora", "dora_vs_lora", "dpo_vs_ppo"])
def test_bundled_studies_validate(study, tmp_path, monkeypatch):
    """Every variant of every study (and of its --scale version) is a valid run config with loadable tasks."""
    from pathlib import Path

    from tunelab.lab.compare import run_sweep
    from tunelab.lab.sweep import config_path

    path = Path(__file__).resolve().parents[2] / "examples" / "studies" / f"{study}.yaml"
    monkeypatch.chdir(tmp_path)  # output_dir is relative to the working directory
    for scale in (False, True):
        sweep = load_sweep(path, scale=scale)
        outcomes = run_sweep(sweep, dry_run=True)
        assert outcomes and all(o.status == "planned" for o in outcomes)
        for v in sweep.variants:  # each variant validated from a temporary copy: a dry run writes nothing
            assert not (tmp_path / config_path(sweep, v)).exists()
        assert list(tmp_path.iterdir()) == []

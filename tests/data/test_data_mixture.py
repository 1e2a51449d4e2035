"""Several data.train files: a plain list concatenates; weights are sampling proportions of a mixture drawn once
from train.seed (data/mixture.py's rule); bad weights are one line with the config's file:line."""

import json
from collections import Counter

import pytest

from tests.helpers import save_tiny_model, write_config, write_jsonl
from tunelab.cli import main
from tunelab.data.mixture import SourceRecords, load_sources, mix, shares
from tunelab.data.sources import Record
from tunelab.errors import TunelabError
from tunelab.objectives import load_run_config
from tunelab.train.prepare import run_records


def _part(name, n, weight):
    return SourceRecords(name, weight, [Record({"text": f"{name}{i}"}, f"{name}.jsonl:{i + 1}") for i in range(n)])


def test_shares_sum_to_the_total_by_largest_remainder():
    assert shares([500, 500], [0.7, 0.3]) == [700, 300]
    assert shares([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    assert shares([3, 4], [1, 1]) == [4, 3]  # 3.5 and 3.5: the tie goes to the first
    assert sum(shares([7, 11, 13], [0.2, 0.5, 0.3])) == 31


def test_weighted_mixture_hits_the_proportions_and_is_reproducible_per_seed():
    parts = [_part("a", 200, 0.7), _part("b", 800, 0.3)]
    rows = mix(parts, seed=3)
    by_file = Counter(r.origin.split(".")[0] for r in rows)
    assert len(rows) == 1000 and by_file == {"a": 700, "b": 300}  # exact shares of N = 200 + 800
    # a (200 rows, 700 wanted): every row 3 times + 100 drawn once more; b (800 rows, 300 wanted): a subset
    a_counts = Counter(r.origin for r in rows if r.origin.startswith("a"))
    assert sorted(Counter(a_counts.values()).items()) == [(3, 100), (4, 100)]
    b_counts = Counter(r.origin for r in rows if r.origin.startswith("b"))
    assert set(b_counts.values()) == {1} and len(b_counts) == 300
    assert [r.origin for r in mix(parts, seed=3)] == [r.origin for r in rows]  # same seed, same rows
    assert [r.origin for r in mix(parts, seed=4)] != [r.origin for r in rows]  # another seed, another draw
    # every row keeps its file:line origin
    assert all(r.data["text"] == r.origin.split(".")[0] + str(int(r.origin.split(":")[1]) - 1) for r in rows)


def test_seeded_draw_fraction_within_tolerance_for_uneven_weights():
    parts = [_part("a", 333, 2.0), _part("b", 667, 1.0)]  # weights need not sum to 1: 2/3 and 1/3
    rows = mix(parts, seed=0)
    frac = sum(r.origin.startswith("a") for r in rows) / len(rows)
    assert len(rows) == 1000 and frac == pytest.approx(2 / 3, abs=1e-3)


def test_plain_list_concatenates_and_unweighted_items_count_as_one(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(5)])
    rows = mix(load_sources(load_run_config(write_config(tmp_path / "c.yaml", data={
        "train": [str(a), str(b)]})).data.train_sources()), seed=0)
    assert [r.data["text"] for r in rows] == ["a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"]
    limited, _ = run_records(load_run_config(write_config(tmp_path / "c.yaml", data={
        "train": [str(a), str(b)], "limit": 2, "eval_fraction": 0.0})))
    assert [r.data["text"] for r in limited] == ["a0", "a1", "b0", "b1"]  # data.limit: the first rows of each file
    cfg = load_run_config(write_config(tmp_path / "c.yaml", data={"train": [str(a), {"path": str(b), "weight": 3}]}))
    assert [(s.path, s.weight) for s in cfg.data.train_sources()] == [(str(a), None), (str(b), 3.0)]
    rows = mix(load_sources(cfg.data.train_sources()), seed=0)
    assert Counter(r.data["text"][0] for r in rows) == {"a": 2, "b": 6}  # 1 : 3 of N = 8


def test_held_out_split_comes_before_the_mixture(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(90)])
    cfg = load_run_config(write_config(tmp_path / "c.yaml", data={
        "train": [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}], "eval_fraction": 0.2},
        train={"seed": 5}))
    train, held = run_records(cfg)
    assert len(held) == 20 and len(train) == 80
    assert not {r.origin for r in held} & {r.origin for r in train}  # a repeated row is never held out too
    assert Counter(r.origin.split("/")[-1][0] for r in train) == {"a": 40, "b": 40}


@pytest.mark.parametrize("item, message", [
    ({"path": "b.jsonl", "weight": 0}, "item 1 (b.jsonl): weight must be positive, got 0"),
    ({"path": "b.jsonl", "weight": -0.5}, "item 1 (b.jsonl): weight must be positive, got -0.5"),
    ({"path": "b.jsonl", "weight": "lots"}, "item 1 (b.jsonl): weight must be a positive number, got 'lots'"),
    ({"path": "b.jsonl", "weight": True}, "item 1 (b.jsonl): weight must be a positive number, got True"),
    ({"path": "b.jsonl", "wieght": 1}, "item 1: unknown key 'wieght' (an item has path and weight)"),
    ({"weight": 1}, "item 1: needs a path"),
    (3, "item 1: expected a path or {path, weight}, got int"),
])
def test_bad_items_are_one_line_with_the_config_line(tmp_path, item, message):
    with pytest.raises(TunelabError) as e:
        load_run_config(write_config(tmp_path / "c.yaml", output_dir="o", data={"train": ["a.jsonl", item]}))
    lines = str(e.value).splitlines()
    assert lines == [f"{tmp_path / 'c.yaml'}:3: data.train: {message}"]


def test_data_inspect_shows_per_source_counts(tmp_path, tokenizer, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"x{i}", "completion": f"y{i}"} for i in range(2)])
    model = save_tiny_model(tmp_path / "m", tokenizer)
    cfg = write_config(tmp_path / "c.yaml", model={"name": str(model)},
                       data={"train": [{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 0.5}]})
    assert main(["data", "inspect", str(cfg), "--n", "1", "--json"]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)) == 1  # stdout stays one JSON document
    assert f"{a}: 6 rows, weight 0.5 → 4 rows per epoch (50% of the mixture)" in out.err
    assert f"{b}: 2 rows, weight 0.5 → 4 rows per epoch (50% of the mixture)" in out.err


def test_budget_and_provenance_count_every_file(tmp_path):
    import hashlib

    from tunelab.train.accounting import configured, run_provenance

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(4)])
    cfg = load_run_config(write_config(tmp_path / "c.yaml", data={
        "train": [str(a), {"path": str(b), "weight": 2}], "packing": False, "eval_fraction": 0.0},
        train={"batch_size": 2, "epochs": 1}))
    assert configured(cfg)["steps"] == 5  # 10 rows (a weighted mixture has as many as its files) / 2
    hashes = run_provenance(cfg, tmp_path)["hashes"]
    for i, path in enumerate((a, b)):
        assert hashes[f"data.train[{i}]"] == hashlib.sha256(path.read_bytes()).hexdigest()

"""Fuzzing the loaders (Hypothesis): generated malformed records, files and configs either load or fail with one
`TunelabError` line — never another exception type (a traceback for the user).

Deterministic (`derandomize=True`: the same examples on every run) and small, so it stays fast in CI; search
harder locally with e.g. ``TUNELAB_FUZZ_EXAMPLES=2000``.
"""

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.config import RunConfig, load_config
from tunelab.data.formats import prompt_of, to_sample
from tunelab.data.kinds import data_kind
from tunelab.data.preference import to_pair, to_unpaired
from tunelab.data.sources import Record, load_records
from tunelab.data.templates import get_template
from tunelab.errors import TunelabError

FUZZ = settings(max_examples=int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", 120)), derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# keys the format detectors look at, so generated records hit the real code paths, plus a few others
KEYS = ["instruction", "input", "output", "messages", "conversations", "role", "content", "from", "value", "prompt",
        "completion", "chosen", "rejected", "text", "label", "system", "question", "margin", "task_id", "x"]
ROLES = ["user", "assistant", "system", "input", "human", "gpt", "tool", "", "USER"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(ROLES), st.just("\n\nHuman: hi\n\nAssistant: yo"))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(ROLES), "content": scalars,
                                                        "from": st.sampled_from(ROLES), "value": scalars}),
                    max_size=4)
# well-formed records with hostile contents (template markup, special tokens, blanks), so the encoders are reached
texts = st.one_of(st.text(max_size=20), st.sampled_from(
    ["", " ", "\n", "<|im_end|>", "<|im_start|>assistant", "{{ x }}", "{% if %}", "### Response:", "[INST]",
     "<|eot_id|>", "</s>", "\u200b", "\ud7ff", "a" * 300]))
chat = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "input"]),
                                       "content": texts}), min_size=1, max_size=4)
well_formed = st.one_of(
    st.fixed_dictionaries({"messages": chat}),
    st.fixed_dictionaries({"instruction": texts, "output": texts}, optional={"input": texts}),
    st.fixed_dictionaries({"prompt": st.one_of(texts, chat), "completion": texts}),
    st.fixed_dictionaries({"text": texts}),
    st.fixed_dictionaries({"prompt": texts, "chosen": st.one_of(texts, chat), "rejected": st.one_of(texts, chat)},
                          optional={"margin": st.one_of(st.floats(), st.text(max_size=3))}),
    st.fixed_dictionaries({"chosen": chat, "rejected": chat}),
    st.fixed_dictionaries({"prompt": texts, "completion": texts, "label": st.one_of(st.booleans(), texts)}),
)
records = st.one_of(json_values, well_formed,
                    st.dictionaries(st.sampled_from(KEYS), st.one_of(scalars, messages), max_size=5))


def _one_line(e: TunelabError) -> None:
    assert str(e) and "\n" not in str(e)


def _tolerated(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except TunelabError as e:
        _one_line(e)
        return None


@FUZZ
@given(rows=st.lists(records, min_size=1, max_size=4),
       template=st.sampled_from(["chatml", "tokenizer", "alpaca", "llama3", "phi3", "mistral"]))
def test_records_parse_or_fail_with_one_line(rows, template, tokenizer):
    recs = [Record(r, f"d.jsonl:{i + 1}") for i, r in enumerate(rows) if isinstance(r, dict)]
    for r in recs:
        for fmt in ("auto", "alpaca", "messages", "prompt_completion", "text"):
            _tolerated(to_sample, r, fmt)
        _tolerated(to_pair, r)
        _tolerated(to_unpaired, r)
        _tolerated(prompt_of, r)
    if recs:  # the whole path to token ids, through each data kind
        tmpl = get_template(template, tokenizer)
        cfg = RunConfig.model_validate({"data": {"max_length": 48}, "samples": {"n_heldout": 1}})
        for kind in ("sft", "pairs", "unpaired"):
            _tolerated(data_kind(kind).encode, tokenizer, tmpl, recs, recs[:1], cfg)


file_bodies = st.one_of(
    st.lists(st.one_of(records.map(json.dumps), st.text(max_size=30)), max_size=5).map("\n".join),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
    st.lists(st.lists(st.text(alphabet='ab,"\n\r\ufeff', max_size=6), max_size=3).map(",".join), max_size=4)
    .map("\n".join),
)


@FUZZ
@given(body=file_bodies, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]), limit=st.sampled_from([None, 1, 3]))
def test_data_files_load_or_fail_with_one_line(body, suffix, encoding, limit):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(body.encode(encoding, errors="replace"))
        recs = _tolerated(load_records, str(path), limit=limit)
        assert recs is None or (recs and all(isinstance(r.data, dict) for r in recs))


SECTIONS = ["output_dir", "model", "data", "train", "lora", "rl", "pref", "reference", "samples", "eval", "stages",
            "method", "objective", "overwrite", "resume"]
DOTTED = ["train.lr", "train.betas", "train.max_grad_norm", "train.batch_size", "data.max_length", "lora.r",
          "lora.target_modules", "rl.top_p", "rl.rewards", "model.device", "model", "train", "stages",
          "data.eval_fraction", "train.seed", "x.y", "train.lr.x", ".", "", "lora.rank_pattern"]
yaml_values = st.one_of(st.sampled_from(["1e-4", "-1", "0", "nan", ".inf", "[0.9, 2]", "{a: 1}", "null", "true",
                                         "'x'", "[", "}", "&a", "*a", "!!python/object:os.system", "1e400",
                                         "99999999999999999999999", "- a", "a: b: c", "\t"]),
                        st.text(max_size=10))


@FUZZ
@given(body=st.lists(st.tuples(st.sampled_from(SECTIONS + ["  lr", "  r", "- ", "???"]), yaml_values), max_size=5),
       overrides=st.lists(st.tuples(st.sampled_from(DOTTED), yaml_values), max_size=3),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1"]))
def test_configs_load_or_fail_with_one_line(body, overrides, encoding):
    text = "".join(f"{k}: {v}\n" for k, v in body)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_bytes(text.encode(encoding, errors="replace"))
        cfg = _tolerated(load_config, path, [f"{k}={v}" for k, v in overrides])
        assert cfg is None or isinstance(cfg, RunConfig)


@pytest.mark.parametrize("override", ["noequals", "=1", "train.lr=", "train=3", "stages.0.name=x",
                                      "train.betas=[0.9]", "lora=[1]"])
def test_odd_overrides_found_by_fuzzing(override):
    with pytest.raises(TunelabError) as e:
        load_config(None, [override, "train.lr=abc"])
    _one_line(e.value)


# --- hostile input within a fixed memory budget: YAML aliases, deep nesting, huge records -------------------------
# Python allocations are traced (tracemalloc) while one input is loaded; the peak must stay under the budget, so an
# input that expands (aliases), recurses (nesting) or is simply big (a record) is refused before it is built.
BUDGET = 64 * 2**20


def _within_budget(fn, *args, **kwargs):
    import tracemalloc

    tracemalloc.start()
    try:
        out = _tolerated(fn, *args, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < BUDGET, f"peak {peak / 2**20:.0f} MB"
    return out


def _alias_yaml(levels, fanout, kind, merge, cycle, depth):
    """Anchors that each reference the previous one `fanout` times (lists, mappings or merge keys), optionally an
    alias inside its own anchor, and a flow collection `depth` deep."""
    lines = ["train:", "  lr: 1e-4", "a0: &a0 {x: 1, y: 1.5e-3}" if kind == "map" else "a0: &a0 [lol, 1e-4]"]
    for i in range(1, levels + 1):
        refs = [f"*a{i - 1}"] * fanout
        if merge and kind == "map":
            lines.append(f"a{i}: &a{i} {{<<: [{', '.join(refs)}], k{i}: {i}}}")
        elif kind == "map":
            lines.append(f"a{i}: &a{i} {{{', '.join(f'k{j}: {r}' for j, r in enumerate(refs))}}}")
        else:
            lines.append(f"a{i}: &a{i} [{', '.join(refs)}]")
    if cycle:
        lines.append("c: &c [1, *c]")
    lines.append("d: " + "[" * depth + "]" * depth)
    return "\n".join(lines) + "\n"


@FUZZ
@given(levels=st.integers(0, 12), fanout=st.integers(1, 12), kind=st.sampled_from(["list", "map"]),
       merge=st.booleans(), cycle=st.booleans(), depth=st.sampled_from([0, 5, 99, 101, 5000]),
       where=st.sampled_from(["config", "task", "sweep"]))
def test_yaml_aliases_and_nesting_load_or_fail_within_the_budget(levels, fanout, kind, merge, cycle, depth, where):
    from tunelab.eval.tasks import task_from_yaml
    from tunelab.lab.sweep import load_sweep

    text = _alias_yaml(levels, fanout, kind, merge, cycle, depth)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.yaml"
        if where == "config":
            path.write_text(text)
            _within_budget(load_config, path)
        elif where == "task":
            path.write_text("kind: exact\ndata: d.jsonl\n" + text.replace("train:", "extra:"))
            _within_budget(task_from_yaml, path)
        else:
            path.write_text("grid: {train.lr: [1, 2]}\n" + text.replace("train:", "extra:"))
            _within_budget(load_sweep, path)


@settings(FUZZ, max_examples=max(FUZZ.max_examples // 3, 1))
@given(depth=st.sampled_from([1, 50, 99, 100, 101, 990, 5000, 200_000]), wide=st.integers(0, 3),
       size_kb=st.sampled_from([0, 10, 63, 65, 300, 1000]), filler=st.sampled_from(["{},", "[],", "0,", '"ab",']),
       suffix=st.sampled_from([".jsonl", ".json"]), where=st.integers(0, 2))
def test_deep_and_huge_records_load_or_fail_within_the_budget(depth, wide, size_kb, filler, suffix, where):
    """With a 64 KB record limit, records of up to 1 MB of tiny values (which would take ~50× that as Python
    objects) and nesting up to 200,000 deep."""
    nested = "[" * depth + ",".join(["1"] * wide) + "]" * depth
    big = "[" + filler * (size_kb * 1024 // len(filler)) + "0]"
    rows = ['{"instruction": "a", "output": "b"}'] * 3
    rows[where] = '{"instruction": "a", "output": "b", "n": %s, "big": %s}' % (nested, big)
    old = os.environ.get("TUNELAB_MAX_RECORD_MB")
    os.environ["TUNELAB_MAX_RECORD_MB"] = str(64 / 1024)
    try:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"data{suffix}"
            path.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(rows) + "]")
            recs = _within_budget(load_records, str(path))
            assert recs is None or len(recs) == 3
    finally:
        if old is None:
            os.environ.pop("TUNELAB_MAX_RECORD_MB")
        else:
            os.environ["TUNELAB_MAX_RECORD_MB"] = old

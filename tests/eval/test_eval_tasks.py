"""Task YAML loading: bundled registry, validation errors as one line, fingerprints that track edits."""

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.eval.tasks import list_tasks, load_task

BUNDLED = {"gsm": ("exact", 100), "gsm_loss": ("perplexity", 100), "humaneval": ("code", 164),
           "humaneval_heldout": ("code", 82),
           "mc_reasoning": ("choice", 200), "prose_loss": ("perplexity", 34), "python_loss": ("perplexity", 52)}


def test_bundled_tasks_load_with_their_sizes():
    assert set(BUNDLED) <= set(list_tasks())
    for name, (kind, size) in BUNDLED.items():
        task = load_task(name)
        assert task.kind == kind and task.data_path.is_file()
        assert len(task.records()) == size, name


def test_bundled_mc_items_are_well_formed():
    for rec in load_task("mc_reasoning").records():
        choices, ans = rec.data["choices"], rec.data["answer"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= ans < 4


def test_gsm_heldout_disjoint_from_training():
    from tunelab.eval.tasks import TASKS_DIR

    train = {json.loads(ln)["input"] for ln in (TASKS_DIR.parent / "data" / "gsm_sft.jsonl").open()}
    assert not train & {r.data["input"] for r in load_task("gsm").records()}


def test_humaneval_heldout_disjoint_from_preference_pairs():
    from tunelab.eval.tasks import TASKS_DIR

    pairs = {json.loads(ln)["source"] for ln in (TASKS_DIR.parent / "data" / "humaneval_pref.jsonl").open()}
    heldout = [r.data["task_id"] for r in load_task("humaneval_heldout").records()]
    assert heldout[0] == "HumanEval/82" and heldout[-1] == "HumanEval/163"
    assert pairs and not pairs & set(heldout)


def test_skip_leaves_out_leading_records_and_composes_with_limit(make_task):
    task = make_task([{"text": f"r{i}"} for i in range(5)], kind="perplexity", format="text", skip=2)
    assert [r.data["text"] for r in task.records()] == ["r2", "r3", "r4"]
    assert [r.data["text"] for r in task.records(2)] == ["r2", "r3"]
    with pytest.raises(TunelabError, match="skip=5 leaves no records"):
        make_task([{"text": "x"}] * 5, kind="perplexity", skip=5).records()


@pytest.mark.parametrize("fields, message", [
    ({"kind": "nope"}, "kind must be one of"),
    ({"kind": "choice", "prompt": "{q}", "masking": "none"}, "masking: field not used by kind 'choice'"),
    ({"kind": "exact", "extrakt": "gsm8k"}, "extrakt: unknown field"),
    ({"kind": "exact", "extract": "regex"}, "needs a `regex:` pattern"),
    ({"kind": "exact", "extract": "fuzzy"}, "extract:"),
    ({"kind": "choice"}, "a choice task needs a prompt"),
    ({"kind": "code", "n_samples": 2, "k": [1, 5]}, "every k must be between 1 and n_samples"),
])
def test_bad_task_files_name_the_problem(make_task, fields, message):
    with pytest.raises(TunelabError, match=message):
        make_task([{"text": "x"}], **fields)


def test_unknown_task_and_missing_data(tmp_path):
    with pytest.raises(TunelabError, match="unknown task 'nosuch'.*bundled: .*gsm"):
        load_task("nosuch")
    (tmp_path / "t.yaml").write_text("kind: perplexity\ndata: missing.jsonl\n")
    with pytest.raises(TunelabError, match="data file not found"):
        load_task(str(tmp_path / "t.yaml"))


def test_user_task_relative_data_name_default_and_fingerprint(make_task):
    task = make_task([{"text": "hello"}], kind="perplexity", format="text")
    assert task.name.startswith("t") and task.spec.masking == "prompt"
    before = task.fingerprint()
    assert task.fingerprint() == before
    task.data_path.write_text(json.dumps({"text": "changed"}) + "\n")
    assert task.fingerprint() != before

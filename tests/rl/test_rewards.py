"""Rewards for online RL: each built-in function on hand-made rollouts, composition with weights, user functions
named "module:function", and the one-line errors naming the reward that failed."""

import math

import pytest
import yaml

from tunelab.data.sources import Record
from tunelab.errors import TunelabError
from tunelab.eval.sandbox import probe
from tunelab.rl.rewards import REWARDS, RewardInputs, build_rewards

needs_bwrap = pytest.mark.skipif(probe() is not None, reason=f"no OS sandbox here ({probe()}): code is refused "
                                 "(tests/eval/test_sandbox_escapes.py checks the refusal)")

GSM = {"instruction": "Solve the math word problem.", "input": "What is 600 + 400?",
       "output": "600 + 400 = 1000\n#### 1000", "answer": "1000"}
ADD = {"task_id": "Toy/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "entry_point": "add"}


def _inputs(completions, record=GSM, **kw):
    return RewardInputs(completions, [Record(record, f"gsm.jsonl:{i + 1}") for i in range(len(completions))], **kw)


def _one(spec, batch, **build):
    scores = build_rewards([spec], **build)(batch)
    return scores.per_function[next(iter(scores.per_function))]


def test_exact_match_uses_the_eval_extractors_and_normalisation():
    batch = _inputs(["So the total is 1,000.\n#### 1,000", "#### $1000.00", "The answer is 1000", "#### 999",
                     "no number here"])
    assert _one({"name": "exact_match"}, batch) == [1.0, 1.0, 0.0, 0.0, 0.0]  # default: gsm8k, as the gsm task
    assert _one({"name": "exact_match", "extract": "last_number"}, batch) == [1.0, 1.0, 1.0, 0.0, 0.0]
    regex = {"name": "exact_match", "extract": "regex", "regex": r"answer is (\d+)"}
    assert _one(regex, batch) == [0.0, 0.0, 1.0, 0.0, 0.0]
    # a full GSM8K solution in the answer field is reduced to its '#### N' number, like in evaluation
    solution = {**GSM, "answer": "600 + 400 = 1000\n#### 1,000"}
    assert _one({"name": "exact_match"}, _inputs(["#### 1000"], solution)) == [1.0]
    # plain dicts are accepted as records
    assert _one({"name": "exact_match"}, RewardInputs(["#### 7"], [{"answer": "7"}])) == [1.0]


def test_exact_match_default_is_what_the_bundled_gsm_task_uses():
    from tunelab.eval.tasks import load_task

    spec = load_task("gsm").spec
    assert (spec.extract, spec.answer_field) == ("gsm8k", "answer")
    rec = load_task("gsm").records(1)[0]
    good = f"Some reasoning.\n#### {rec.data['answer']}"
    assert _one({"name": "exact_match"}, RewardInputs([good, "#### -1"], [rec, rec])) == [1.0, 0.0]


def test_exact_match_missing_gold_answer_names_reward_and_record():
    with pytest.raises(TunelabError, match=r"^reward 'exact_match': gsm.jsonl:1: missing answer field 'gold'$"):
        _one({"name": "exact_match", "answer_field": "gold"}, _inputs(["#### 1"]))


@needs_bwrap
def test_code_tests_pass_fail_and_chat_blocks():
    batch = _inputs(["    return a + b\n", "    return a - b\n", "    while True:\n        pass\n"], ADD)
    assert _one({"name": "code_tests", "timeout": 3.0}, batch, allow_code_execution=True) == [1.0, 0.0, 0.0]
    chat = _inputs(["Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
                    "```python\npass\n```"], ADD)
    assert _one({"name": "code_tests", "chat": True}, chat, allow_code_execution=True) == [1.0, 0.0]


def test_code_tests_refused_without_the_flag():
    # rewards run in `tunelab train`, which takes eval.allow_code_execution=true (it has no --allow-code-execution)
    with pytest.raises(TunelabError, match=r"^reward 'code_tests' executes model-written code.*"
                                           r"eval.allow_code_execution=true") as e:
        build_rewards([{"name": "code_tests"}])
    assert "--allow-code-execution" not in str(e.value)
    with pytest.raises(TunelabError, match="allow_code_execution is not a reward option"):
        build_rewards([{"name": "code_tests", "allow_code_execution": True}])  # a config cannot opt in by itself
    with pytest.raises(TunelabError, match="sandbox is not a reward option; it is the run's eval.sandbox"):
        build_rewards([{"name": "code_tests", "sandbox": "unsafe_inprocess"}], allow_code_execution=True)


@needs_bwrap
def test_code_tests_called_directly_scores_a_nonce_faking_wrong_completion_zero():
    """The factory called by hand, no composition: a wrong add() that prints a nonce-like line, reads
    ``__main__`` and exits 0 before the asserts scores 0.0 — screened (counted) and, run anyway, failed."""
    fake = ("    import os, sys\n    print(getattr(sys.modules['__main__'], '_nonce', '0' * 32))\n"
            "    sys.stdout.flush()\n    os._exit(0)\n")
    hidden = "    import os\n    print('0' * 32, flush=True)\n    getattr(os, '_' + 'exit')(0)\n"  # past the screen
    fn = REWARDS["code_tests"](allow_code_execution=True, timeout=5.0)
    assert fn(_inputs([fake, hidden, "    return a + b\n"], ADD)) == [0.0, 0.0, 1.0]
    assert fn.metrics == {"reward_hacking_attempts": 1}
    scores = build_rewards([{"name": "code_tests"}, {"name": "format", "weight": 0.0}],
                           allow_code_execution=True)(_inputs([fake, fake], ADD))
    assert scores.metrics()["reward_hacking_attempts"] == 2 and scores.metrics()["reward_code_tests"] == 0.0


def test_format_truncation_and_length_penalty():
    texts = ["Reasoning.\n#### 1,000", "#### 12 and more words", "#### 3\n", "no answer"]
    assert _one({"name": "format"}, _inputs(texts)) == [1.0, 0.0, 1.0, 0.0]
    assert _one({"name": "format", "pattern": "^no"}, _inputs(texts)) == [0.0, 0.0, 0.0, 1.0]
    batch = _inputs(["a", "b", "c", "d"], completion_ids=[[1] * 4, [1] * 10, [1] * 12, [1] * 40],
                    finish_reasons=["stop", "stop", "length", "length"])
    assert _one({"name": "truncation"}, batch) == [0.0, 0.0, -1.0, -1.0]
    # DAPO soft overlong punishment: free up to 10 tokens, then linear to -1 over the next 4, clipped at -1
    assert _one({"name": "length_penalty", "target": 10, "scale": 4}, batch) == [0.0, 0.0, -0.5, -1.0]
    assert _one({"name": "length_penalty", "target": 10}, batch) == [0.0, 0.0, -0.2, -1.0]  # scale = target
    with pytest.raises(TunelabError, match=r"^reward 'truncation': needs the finish reasons"):
        _one({"name": "truncation"}, _inputs(["a"]))
    with pytest.raises(TunelabError, match=r"^reward 'length_penalty': needs the completion token ids"):
        _one({"name": "length_penalty", "target": 1}, _inputs(["a"]))


def test_composite_weights_and_per_function_scores():
    rewards = build_rewards(yaml.safe_load("""
        - {name: exact_match, weight: 1.0}
        - {name: format, weight: 0.25}
        - {name: format, weight: 0.0, pattern: 'total'}
    """))
    assert rewards.weights == {"exact_match": 1.0, "format": 0.25, "format_2": 0.0}
    scores = rewards(_inputs(["The total is 1000.\n#### 1000", "#### 5", "1000"]))
    assert scores.per_function == {"exact_match": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0],
                                   "format_2": [1.0, 0.0, 0.0]}
    assert scores.total == [1.25, 0.25, 0.0]
    assert scores.metrics() == pytest.approx({"reward": 0.5, "reward_exact_match": 1 / 3, "reward_format": 2 / 3,
                                              "reward_format_2": 1 / 3})


def test_from_samples_repeats_prompt_records_per_row():
    import torch

    from tunelab.sampling import Samples

    ids = torch.tensor([[5, 6, 0], [7, 8, 9]])
    s = Samples(prompt_ids=torch.ones(2, 2, dtype=torch.long), prompt_mask=torch.ones(2, 2, dtype=torch.long),
                completion_ids=ids, completion_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
                logprobs=torch.zeros(2, 3), finish_reason=("stop", "length"), prompt_index=torch.tensor([0, 0]))
    batch = RewardInputs.from_samples(s, ["#### 1000", "#### 2"], [Record(GSM, "g:1")],
                                      [[{"role": "user", "content": "q"}]])
    assert batch.completion_ids == [[5, 6], [7, 8, 9]] and batch.finish_reasons == ["stop", "length"]
    assert [r.origin for r in batch.prompt_records] == ["g:1", "g:1"] and batch.messages(1)[0]["content"] == "q"
    assert build_rewards([{"name": "exact_match"}])(batch).total == [1.0, 0.0]


def test_user_function_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def brevity(batch, limit=10):\n    return [1.0 if len(t) <= limit else 0.0 for t in batch.completions]\n"
        "def boom(batch):\n    raise KeyError('answer')\n"
        "def short(batch):\n    return [1.0]\n"
        "def nan(batch):\n    return [float('nan')] * len(batch)\n"
        "NOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    batch = _inputs(["tiny", "a rather long completion"])
    assert _one({"name": "my_rewards_mod:brevity"}, batch) == [1.0, 0.0]
    assert _one({"name": "my_rewards_mod:brevity", "limit": 100}, batch) == [1.0, 1.0]
    for fn, msg in [("boom", "KeyError: 'answer'"), ("short", "returned 1 scores for a batch of 2 completions"),
                    ("nan", "non-finite score nan for row 0")]:
        with pytest.raises(TunelabError) as e:
            build_rewards([{"name": "exact_match"}, {"name": f"my_rewards_mod:{fn}"}])(batch)
        assert str(e.value) == f"reward 'my_rewards_mod:{fn}': {msg}" and "\n" not in str(e.value)
    for spec, msg in [({"name": "my_rewards_mod:missing"}, "has no attribute 'missing'"),
                      ({"name": "no_such_module_xyz:f"}, "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
                      ({"name": "my_rewards_mod:NOT_A_FUNCTION"}, "is not a function"),
                      ({"name": "my_rewards_mod:brevity", "colour": 1}, "do not fit its signature")]:
        with pytest.raises(TunelabError, match=msg):
            build_rewards([spec])


def test_builtin_function_that_raises_is_one_line_naming_it(monkeypatch):
    def explode():
        return lambda batch: 1 / 0

    monkeypatch.setitem(REWARDS, "explode", explode)
    with pytest.raises(TunelabError) as e:
        build_rewards([{"name": "explode"}])(_inputs(["x"]))
    assert str(e.value) == "reward 'explode': ZeroDivisionError: division by zero"


@pytest.mark.parametrize("specs, msg", [
    ([], "rl.rewards is empty"),
    ([{"name": "exact_matc"}], r"unknown reward 'exact_matc' \(known: exact_match, code_tests, reward_model, format"),
    ([{"weight": 1.0}], r"rl.rewards\[0\]: needs a 'name'"),
    ([{"name": "exact_match", "weight": "high"}], "weight must be a finite number"),
    ([{"name": "exact_match", "extract": "first"}], "extract must be one of gsm8k, last_number, regex, none"),
    ([{"name": "exact_match", "extract": "regex"}], "needs a regex pattern"),
    ([{"name": "format", "pattern": "(("}], "bad regex"),
    ([{"name": "format", "patern": "x"}], r"unknown option 'patern' \(options: pattern\)"),
    ([{"name": "length_penalty"}], "missing option 'target'"),
    ([{"name": "length_penalty", "target": -3}], "target must be an integer >= 0"),
    ([{"name": "reward_model", "run_dir": "/nonexistent/rm"}], "is not a finished reward-model run"),
])
def test_bad_specs_fail_at_build_time(specs, msg):
    with pytest.raises(TunelabError, match=msg) as e:
        build_rewards(specs)
    assert "\n" not in str(e.value)


def test_reward_model_scores_like_the_reward_model_run(tiny, tokenizer, tmp_path):
    import torch

    from tunelab.objectives.reward import add_reward_head, load_reward_model, save_reward_head

    # a tiny reward-model run directory: model/ folder + reward head + config.yaml, as a finished run leaves it
    run = tmp_path / "rm"
    model = tiny("llama")
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    add_reward_head(model)
    with torch.no_grad():
        model.reward_head.weight.normal_(std=1.0)
    save_reward_head(model, run)
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": "reward", "model": {"name": str(run / "model")}}))

    records = [Record({"prompt": "Is 1 a number?", "completion": "Yes."}, "p:1"),
               Record({"instruction": "Say hi.", "output": "Hi!"}, "p:2")]
    batch = RewardInputs(["Yes, 1 is a number.", "Hello there."], records)
    got = _one({"name": "reward_model", "run_dir": str(run), "device": "cpu"}, batch)
    rm = load_reward_model(run, "cpu")
    want = [rm.score([{"role": "user", "content": "Is 1 a number?"}], "Yes, 1 is a number."),
            rm.score([{"role": "user", "content": "Say hi."}], "Hello there.")]
    assert got == pytest.approx(want, abs=1e-5) and all(math.isfinite(x) for x in got) and got[0] != got[1]
    # given prompt messages win over the record's own
    given = RewardInputs(batch.completions, records, prompt_messages=[[{"role": "user", "content": "Say hi."}]] * 2)
    spec = {"name": "reward_model", "run_dir": str(run), "device": "cpu"}
    assert _one(spec, given)[1] == pytest.approx(want[1], abs=1e-5)

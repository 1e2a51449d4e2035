"""Your own reward function ("module:function"): found next to the config or in the working directory, TRL's
signatures (standard and conversational), a per-call time limit, and return values checked (a string or a dict
is not a list of rewards). Module names are unique per test: Python caches imported modules."""

import itertools
import threading

import numpy as np
import pytest
import torch

import tunelab.rl.user_rewards as user_rewards
from tunelab.config import load_config
from tunelab.data.sources import Record
from tunelab.errors import TunelabError
from tunelab.rl.rewards import RewardInputs, build_rewards

_ids = itertools.count()
GSM = {"instruction": "Solve.", "input": "What is 2 + 2?", "output": "#### 4", "answer": "4"}
CHAT = {"messages": [{"role": "user", "content": "Think, then answer."}], "solution": "4"}


def _module(folder, source: str) -> str:
    name = f"tunelab_user_reward_{next(_ids)}"
    (folder / f"{name}.py").write_text(source)
    return name


def _batch(completions, record=GSM):
    return RewardInputs(completions, [Record(record, f"d.jsonl:{i + 1}") for i in range(len(completions))],
                        completion_ids=[[1] * (i + 1) for i in range(len(completions))],
                        finish_reasons=["stop"] * len(completions))


def _scores(spec, batch):
    return build_rewards([spec])(batch).per_function[spec["name"]]


def test_module_next_to_the_config_imports_without_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    name = _module(tmp_path / "cfg", "def short(batch):\n    return [float(len(c) < 5) for c in batch.completions]\n")
    (tmp_path / "cfg" / "run.yaml").write_text(f"objective: grpo\nrl:\n  rewards:\n    - {{name: '{name}:short'}}\n")
    monkeypatch.chdir(tmp_path)  # elsewhere: only the config's folder has the module
    cfg = load_config(tmp_path / "cfg" / "run.yaml")
    assert build_rewards(cfg.rl.rewards)(_batch(["ok", "too long"])).total == [1.0, 0.0]


def test_module_in_the_working_directory_imports(tmp_path, monkeypatch):
    name = _module(tmp_path, "def one(batch):\n    return [1] * len(batch)\n")
    monkeypatch.chdir(tmp_path)
    assert _scores({"name": f"{name}:one"}, _batch(["a", "b"])) == [1.0, 1.0]


def test_missing_module_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunelabError) as e:
        build_rewards([{"name": "tunelab_nowhere_xyz:f"}])
    assert "cannot import 'tunelab_nowhere_xyz': ModuleNotFoundError: no tunelab_nowhere_xyz.py" in str(e.value)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_trl_style_standard_form(tmp_path, monkeypatch):
    """TRL's keywords: prompts / completions as strings, dataset columns as lists, completion_ids, options."""
    name = _module(tmp_path, (
        "def by_len(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
        "def graded(prompts, completions, answer, bonus=0.0, **kwargs):\n"
        "    assert prompts == ['Solve.\\n\\nWhat is 2 + 2?'] * len(completions), prompts\n"
        "    assert kwargs['completion_ids'][1] == [1, 1] and kwargs['trainer_state'] is None\n"
        "    assert kwargs['instruction'] == ['Solve.'] * len(completions)\n"
        "    return [float(c.strip() == a) + bonus for c, a in zip(completions, answer)]\n"
        "def ids_only(completion_ids, **kwargs):\n    return [-len(i) for i in completion_ids]\n"
        "def no_kwargs(completions, answer):\n    return [float(c == a) for c, a in zip(completions, answer)]\n"
        "def wants_solution(completions, solution, **kwargs):\n    return [0.0] * len(completions)\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    batch = _batch([" 4", "5"])
    assert _scores({"name": f"{name}:by_len"}, batch) == [2.0, 1.0]
    assert _scores({"name": f"{name}:graded", "bonus": 0.5}, batch) == [1.5, 0.5]
    assert _scores({"name": f"{name}:ids_only"}, batch) == [-1.0, -2.0]
    assert _scores({"name": f"{name}:no_kwargs"}, _batch(["4", "5"])) == [1.0, 0.0]  # gets only what it names
    with pytest.raises(TunelabError) as e:
        build_rewards([{"name": f"{name}:wants_solution"}])(batch)
    assert "parameter 'solution' is neither a TRL argument" in str(e.value)
    assert "fields: answer, input, instruction, output" in str(e.value)


def test_trl_conversational_form_matches_trl_itself():
    """TRL's own `think_format_reward` (conversational completions) scores the same through tunelab."""
    from trl.rewards import think_format_reward

    texts = ["<think>\nsum\n</think>\n4", "4", "<think>a</think><think>b</think>4"]
    batch = _batch(texts, CHAT)
    ours = _scores({"name": "trl.rewards:think_format_reward"}, batch)
    theirs = think_format_reward([[{"role": "assistant", "content": t}] for t in texts])
    assert ours == [float(x) for x in theirs] and ours[0] == 1.0 and ours[1] == 0.0


def test_conversational_prompts_are_messages(tmp_path, monkeypatch):
    name = _module(tmp_path, (
        "def check(prompts, completions, solution, **kwargs):\n"
        "    assert prompts[0] == [{'role': 'user', 'content': 'Think, then answer.'}], prompts\n"
        "    return [float(c[0]['content'] == s) for c, s in zip(completions, solution)]\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _scores({"name": f"{name}:check"}, _batch(["4", "3"], CHAT)) == [1.0, 0.0]


def test_signature_that_fits_neither_convention_is_refused_before_any_call(tmp_path, monkeypatch):
    name = _module(tmp_path, "def two(a, b):\n    return [0.0]\n"
                             "def positional(completions, /, **kw):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TunelabError) as e:
        build_rewards([{"name": f"{name}:two"}])
    assert str(e.value) == (f"reward '{name}:two': its signature two(a, b); expected tunelab's fn(batch, **options) "
                            "(batch: a RewardInputs) or TRL's fn(completions, **kwargs) or "
                            "fn(prompts, completions, **kwargs)")
    with pytest.raises(TunelabError, match="positional-only"):
        build_rewards([{"name": f"{name}:positional"}])


HANG = "import threading\nRELEASE = threading.Event()\ndef hang(batch):\n    RELEASE.wait()\n    return [0.0]\n"


def test_a_call_that_never_returns_is_one_line_naming_it(tmp_path, monkeypatch):
    name = _module(tmp_path, HANG)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    release = importlib.import_module(name).RELEASE
    try:
        with pytest.raises(TunelabError) as e:
            build_rewards([{"name": f"{name}:hang", "call_timeout": 0.2}])(_batch(["x"]))
        assert str(e.value).startswith(f"reward '{name}:hang': did not return within 0.2 s")
        monkeypatch.setattr(user_rewards, "DEFAULT_TIMEOUT", 0.1)  # the default applies without the option
        with pytest.raises(TunelabError, match="did not return within 0.1 s"):
            build_rewards([{"name": f"{name}:hang"}])(_batch(["x"]))
    finally:
        release.set()
    for bad in (0, -1, "soon", True):
        with pytest.raises(TunelabError, match="call_timeout must be a positive number"):
            build_rewards([{"name": f"{name}:hang", "call_timeout": bad}])


def test_a_busy_loop_is_stopped_and_signal_using_functions_still_work(tmp_path, monkeypatch):
    """In the main thread the limit is a SIGALRM timer: a pure-Python busy loop is stopped, and a function that sets
    its own alarm (as math_verify's timeouts do) runs as it would under TRL — not refused for using signals."""
    import signal
    import time

    name = _module(tmp_path, (
        "import signal\n"
        "def spin(batch):\n    while True:\n        pass\n"
        "def own_alarm(completions, **kw):\n"
        "    old = signal.signal(signal.SIGALRM, lambda *a: None)\n"
        "    signal.alarm(30)\n    signal.alarm(0)\n    signal.signal(signal.SIGALRM, old)\n"
        "    return [1.0] * len(completions)\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(TunelabError, match="did not return within 0.3 s"):
        build_rewards([{"name": f"{name}:spin", "call_timeout": 0.3}])(_batch(["x"]))
    assert time.perf_counter() - t0 < 5
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0 and signal.getsignal(signal.SIGALRM) is signal.SIG_DFL
    assert _scores({"name": f"{name}:own_alarm"}, _batch(["x", "y"])) == [1.0, 1.0]


def test_off_the_main_thread_the_limit_still_holds(tmp_path, monkeypatch):
    name = _module(tmp_path, HANG + "def ok(batch):\n    return [2.0] * len(batch)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    release = importlib.import_module(name).RELEASE
    results = {}

    def run(fn):
        try:
            results[fn] = build_rewards([{"name": f"{name}:{fn}", "call_timeout": 0.2}])(_batch(["x"])).total
        except TunelabError as e:
            results[fn] = str(e)
    try:
        for fn in ("hang", "ok"):
            worker = threading.Thread(target=run, args=(fn,))
            worker.start()
            worker.join(10)
    finally:
        release.set()
    assert results["hang"].startswith(f"reward '{name}:hang': did not return within 0.2 s")
    assert results["ok"] == [2.0]


def test_the_call_keeps_the_callers_grad_mode_and_its_exceptions(tmp_path, monkeypatch):
    name = _module(tmp_path, "import torch\ndef grad(batch):\n    return [float(torch.is_grad_enabled())]\n"
                             "def boom(batch):\n    raise KeyError('answer')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with torch.no_grad():
        assert _scores({"name": f"{name}:grad"}, _batch(["x"])) == [0.0]
    assert _scores({"name": f"{name}:grad"}, _batch(["x"])) == [1.0]
    with pytest.raises(TunelabError) as e:
        build_rewards([{"name": f"{name}:boom"}])(_batch(["x"]))
    assert str(e.value) == f"reward '{name}:boom': KeyError: 'answer'"


@pytest.mark.parametrize("value", [
    "[True, 0, 1.5, 2]", "(1, 2, 3, 4)", "np.array([1, 2, 3, 4.5])", "torch.tensor([1.0, 2.0, 3.0, 4.0])",
    "[np.float32(1), np.int64(2), np.bool_(True), torch.tensor(0.5)]"])
def test_real_number_sequences_are_accepted(value, tmp_path, monkeypatch):
    name = _module(tmp_path, f"import numpy as np\nimport torch\ndef f(batch):\n    return {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scores = _scores({"name": f"{name}:f"}, _batch(["a", "b", "c", "d"]))
    assert scores == [float(x) for x in eval(value, {"np": np, "torch": torch})]  # noqa: S307
    assert all(type(s) is float for s in scores)


@pytest.mark.parametrize("value, message", [
    ('"1111"', "must return a list of numbers (one per completion), got str '1111'"),
    ("{0: .5, 1: .5, 2: .5, 3: .5}", "must return a list of numbers (one per completion), got dict"),
    ("(x for x in [1, 2, 3, 4])", "got generator"),
    ("None", "got NoneType"),
    ("[1.0, None, 1.0, 1.0]", "must return a list of real numbers; row 1 is NoneType (None)"),
    ('["1", "1", "1", "1"]', "row 0 is str ('1')"),
    ("[1j, 1, 1, 1]", "row 0 is complex"),
    ("np.ones((2, 2))", "got a 2-D ndarray of shape (2, 2)"),
    ("[torch.ones(2), 1, 1, 1]", "row 0 is Tensor"),
])
def test_anything_else_is_one_line_naming_the_type(value, message, tmp_path, monkeypatch):
    name = _module(tmp_path, f"import numpy as np\nimport torch\ndef f(batch):\n    return {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TunelabError) as e:
        build_rewards([{"name": f"{name}:f"}])(_batch(["a", "b", "c", "d"]))
    assert str(e.value).startswith(f"reward '{name}:f': ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)

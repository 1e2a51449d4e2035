"""Code tasks: the pass@k estimator, the opt-in flag, scoring saved completions, and the sandbox's walls."""

import json
import os
import socket
import sys
import uuid

import pytest

from tunelab.errors import TunelabError
from tunelab.eval.code import build_program, evaluate_code, pass_at_k
from tunelab.eval.runner import run_tasks
from tunelab.eval.sandbox import probe, run_many
from tunelab.eval.tasks import load_task

# Code runs only behind bubblewrap; without it these are refused (tests/eval/test_sandbox_escapes.py checks that)
needs_bwrap = pytest.mark.skipif(probe() is not None, reason=f"no OS sandbox here ({probe()}): code is refused")


@pytest.mark.parametrize("n, c, k, want", [(5, 2, 1, 0.4), (5, 2, 2, 0.7), (5, 0, 3, 0.0), (5, 4, 2, 1.0),
                                           (1, 1, 1, 1.0), (10, 3, 5, 1 - 21 / 252)])
def test_pass_at_k_unbiased_estimator(n, c, k, want):
    # 1 - C(n-c, k) / C(n, k): e.g. n=5, c=2, k=2 → 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert pass_at_k(n, c, k) == pytest.approx(want)


def test_code_tasks_refuse_without_the_flag(tokenizer, tiny):
    with pytest.raises(TunelabError, match="executes model-written code.*--allow-code-execution"):
        run_tasks(tiny("llama"), tokenizer, "chatml", ["prose_loss", "humaneval"], limit=1, verbose=False)
    with pytest.raises(TunelabError, match="allow_code_execution=True"):
        evaluate_code(None, tokenizer, None, load_task("humaneval"), limit=1, completions=[["x"]])


def _humaneval_task(make_task, n_samples, k):
    rows = [r.data for r in load_task("humaneval").records(2)]
    return rows, make_task(rows, kind="code", n_samples=n_samples, k=k, timeout=5.0)


@needs_bwrap
def test_scoring_saved_completions(make_task):
    rows, task = _humaneval_task(make_task, 1, [1])
    good = rows[0]["canonical_solution"]
    res = evaluate_code(None, None, None, task, allow_code_execution=True, completions=[[good], ["    return 0\n"]])
    assert res["metrics"] == {"pass@1": 0.5}
    assert res["details"]["programs"] == {"passed": 1, "failed": 1, "timeout": 0}
    assert res["details"]["isolation"]["sandbox"] == "bwrap" and res["details"]["reward_hacking_attempts"] == 0
    rows, task = _humaneval_task(make_task, 2, [1, 2])
    good0 = rows[0]["canonical_solution"]
    res = evaluate_code(None, None, None, task, allow_code_execution=True,
                        completions=[[good0, "    return 0\n"], ["    pass\n", "    pass\n"]])
    # problem 0: n=2, c=1 → pass@1 = 0.5, pass@2 = 1; problem 1: c=0 → 0, 0.
    assert res["metrics"]["pass@1"] == pytest.approx(0.25) and res["metrics"]["pass@2"] == pytest.approx(0.5)
    # per problem: pass@k at the smallest k, the passing count, the first completion's text
    assert [(it["score"], it["passed"], it["n_samples"]) for it in res["items"]] == [(0.5, 1, 2), (0.0, 0, 2)]
    assert res["items"][0]["text"] == good0 and res["items"][0]["id"].startswith(task.name + ":0:")


@needs_bwrap
def test_generation_path_on_tiny_model(tokenizer, tiny, make_task):
    rows, _ = _humaneval_task(make_task, 1, [1])
    task = make_task(rows[:1], kind="code", max_new_tokens=8, timeout=3.0)
    res = run_tasks(tiny("llama"), tokenizer, "chatml", [task], allow_code_execution=True, verbose=False)
    r = res[task.name]
    assert r["n"] == 1 and r["metrics"]["pass@1"] == 0.0  # a random model does not solve HumanEval
    assert sum(r["details"]["programs"].values()) == 1 and isinstance(r["samples"][0]["completion"], str)


@needs_bwrap
def test_sandbox_contains_bad_programs_and_passes_good_ones(tmp_path):
    outside = str(tmp_path / "escaped.txt")  # the host's /tmp: the sandbox has a private /tmp of its own
    read_only = os.path.join(sys.prefix, f"tunelab-escape-{uuid.uuid4().hex}.txt")  # visible to it, read-only
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # a service on the host's loopback
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    port = server.getsockname()[1]
    programs = {
        "loop": "while True:\n    pass\n",
        "memory": "x, n = [], 2**20\nwhile True:\n    x.append(bytearray(n))\n    n *= 2\n",  # doubling: fails fast
        "socket": f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', {port}))\n",
        "write_outside": f"open({outside!r}, 'w').write('escaped')\n",
        "write_read_only": f"open({read_only!r}, 'w').write('escaped')\n",
        "write_own_tmp": "open('/tmp/mine.txt', 'w').write('ok')\nassert open('/tmp/mine.txt').read() == 'ok'\n",
        "remove_outside": f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})\n",
        # processes may start inside the sandbox; what they do stays inside it
        "spawn": f"import os\nassert os.system('echo escaped > {outside}') == 0\n",
        "fake_success": "import os\nos._exit(0)\n",
        "exit_zero": "raise SystemExit(0)\n",
        "good": "import os\nopen('scratch.txt', 'w').write('ok')\nassert sum(range(5)) == 10\n"
                "assert 'OPENAI_API_KEY' not in os.environ\n",
    }
    (tmp_path / "keep.txt").write_text("precious")
    os.environ["OPENAI_API_KEY"] = "sk-test-not-real"
    try:
        results = dict(zip(programs, run_many(list(programs.values()), timeout=3.0, memory_mb=512, workers=5)))
    finally:
        del os.environ["OPENAI_API_KEY"]
    assert results["good"].status == "passed", results["good"].output
    assert results["loop"].status == "timeout"
    assert results["memory"].status == "failed" and "MemoryError" in results["memory"].output
    # the sandbox's own loopback (network namespace): the host's service is out of reach
    assert results["socket"].status == "failed" and "ConnectionRefusedError" in results["socket"].output
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()
    assert results["write_outside"].status == "failed" and not os.path.exists(outside)
    assert results["write_read_only"].status == "failed"
    assert "Read-only file system" in results["write_read_only"].output
    assert not os.path.exists(read_only) and results["write_own_tmp"].status == "passed"
    assert results["remove_outside"].status == "failed" and (tmp_path / "keep.txt").read_text() == "precious"
    assert results["spawn"].status == "failed" and "AssertionError" in results["spawn"].output
    assert not os.path.exists(outside)
    assert results["fake_success"].status == "failed" and results["exit_zero"].status == "failed"
    # The harness is still fine afterwards.
    prob = json.loads(load_task("humaneval").data_path.open().readline())
    (after,) = run_many([build_program(prob, prob["canonical_solution"])], timeout=5.0)
    assert after.passed


@needs_bwrap
def test_judge_batch_keeps_each_verdict_apart_and_values_plain():
    """One judge, five candidates of two problems: a pass, an endless loop (timeout, the others unharmed), a
    candidate that kills its own process, a wrong answer; return types survive the crossing exactly."""
    from tunelab.eval.judge import run_batch

    add = {"prelude": "def add(a, b):\n    pass\n", "entry_point": "add",
           "test": "def check(c):\n    assert c(2, 3) == 5\n"}
    kinds = {"prelude": "", "entry_point": "f", "test": (
        "def check(c):\n    r = c()\n    assert r == ((1, 2), {3}, frozenset({4}), {'k': [5.5, None]}, b'x', 1j)\n"
        "    assert [type(x) for x in r] == [tuple, set, frozenset, dict, bytes, complex]\n"
        "    assert c(n=3) == [0, 1, 2] and type(c(n=3)) is list\n")}
    kinds_src = ("import numpy as np\ndef f(n=None):\n    if n is not None:\n        return np.arange(n)\n"
                 "    return ((1, 2), {3}, frozenset({4}), {'k': [5.5, None]}, b'x', 1j)\n")
    jobs = [{**add, "candidate": "def add(a, b):\n    return a + b\n"},
            {**add, "candidate": "def add(a, b):\n    while True:\n        pass\n"},
            {**add, "candidate": "import os, signal\ndef add(a, b):\n    os.kill(os.getpid(), signal.SIGKILL)\n"},
            {**kinds, "candidate": kinds_src},
            {**add, "candidate": "def add(a, b):\n    return a - b\n"}]
    res = run_batch(jobs, timeout=2.0, memory_mb=1024)
    assert [r.status for r in res] == ["passed", "timeout", "failed", "passed", "failed"], [r.output for r in res]
    assert "process died" in res[2].output and "AssertionError" in res[4].output

"""Code generation scored by running tests: pass@k on HumanEval-format problems.

A problem is ``{task_id, prompt, test, entry_point}`` (HumanEval, Chen et al. 2021): ``prompt`` is a function
signature with its docstring, ``test`` defines ``check(candidate)``. The model writes ``n_samples``
completions per problem (greedy for one, sampled otherwise), and each one passes if the program

    prompt + completion + test + "check(entry_point)"          (`build_program`)

would, judged in two parts by `judge.run_tests`: prompt + completion run in one bubblewrap sandbox
(`sandbox.py`), prompt + test in another that sees only the plain data the candidate returns, so the model
cannot print, patch or exit its way to "passed". `screen.flag` first scores completions that reach for exits
or introspection as failed without running them, and counts them (``reward_hacking_attempts``). Because this
executes code written by a model, nothing runs unless the caller opts in (``tunelab eval
--allow-code-execution``; in a run config ``eval.allow_code_execution: true``; in Python
``allow_code_execution=True``), and only behind bubblewrap unless ``sandbox="unsafe_inprocess"``
(``eval.sandbox``) explicitly accepts a Python-level guard instead.

**pass@k** is the probability that at least one of k completions passes. Estimating it as "did any of the
first k pass" is high-variance; Chen et al. give the unbiased estimator from n ≥ k samples with c correct:

    pass@k = 1 − C(n−c, k) / C(n, k)

computed as a running product (``1 − Π_{i=n−c+1}^{n} (1 − k/i)``) so large n does not overflow, and averaged
over problems. With n = k = 1 it is simply the fraction of problems whose greedy completion passes.

In chat mode (``chat: true``) the prompt is asked as a user turn and the code is taken from the first fenced
block of the reply. The program still starts with the original prompt: a reply that redefines the whole
function simply replaces the stub (a docstring-only body is valid Python), one that continues it completes it.
"""

from __future__ import annotations

import re

from ..errors import TunelabError
from .completion import complete
from .judge import run_tests_many
from .sandbox import SandboxResult, check_sandbox, isolation
from .screen import flag
from .tasks import Task, item_id

SANDBOX_HELP = "to run it in tunelab's bubblewrap sandbox (read-only root, private tmpfs, no network, limits)"
CODE_FLAG_HELP = ("executes model-written code; opt in with --allow-code-execution (tunelab eval), "
                  "eval.allow_code_execution: true (a run config; tunelab train ... eval.allow_code_execution=true) "
                  f"or allow_code_execution=True (Python) {SANDBOX_HELP}")
_FENCE = re.compile(r"```(?:[\w+-]*)\n(.*?)(?:```|$)", re.S)


def require_code_execution(task_name: str, allowed: bool, sandbox: str = "bwrap") -> None:
    """Refuse to run a code task unless the caller opted in and the sandbox works on this machine."""
    if not allowed:
        raise TunelabError(f"task '{task_name}' {CODE_FLAG_HELP}")
    check_sandbox(sandbox)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0  # every size-k subset contains a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply, or the reply itself when it has none."""
    m = _FENCE.search(reply)
    return m.group(1) if m else reply


def build_program(problem: dict, completion: str) -> str:
    """The script that passes iff the completed function satisfies the problem's tests."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def judge_completions(pairs: list[tuple[dict, str]], *, timeout: float = 5.0, memory_mb: int = 1024,
                      workers: int = 2, sandbox: str = "bwrap") -> list[SandboxResult]:
    """Judge each (problem, completion): screened (`screen.flag`: failed, ``flagged`` set, not run) or run
    by `judge.run_tests` — prompt + completion as the candidate, the problem's test as the judge."""
    results: list[SandboxResult | None] = [None] * len(pairs)
    jobs = []
    for i, (problem, completion) in enumerate(pairs):
        source = problem["prompt"] + completion
        why = flag(source, problem["prompt"].count("\n") + 1)
        if why:
            results[i] = SandboxResult("failed", f"not run: the completion {why}", 0.0, flagged=why)
        else:
            jobs.append((i, {"candidate": source, "prelude": problem["prompt"], "test": problem["test"],
                             "entry_point": problem["entry_point"]}))
    ran = run_tests_many([j for _, j in jobs], timeout=timeout, memory_mb=memory_mb, workers=workers, mode=sandbox)
    for (i, _), r in zip(jobs, ran):
        results[i] = r
    return results


def _problems(task: Task, limit: int | None) -> list[dict]:
    out = []
    for rec in task.records(limit):
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(rec.data.get(k), str)]
        if missing:
            raise TunelabError(f"{rec.origin}: HumanEval-format problem needs string field(s) {', '.join(missing)}")
        out.append(rec.data)
    return out


def evaluate_code(model, tokenizer, template, task: Task, limit: int | None = None,
                  allow_code_execution: bool = False, completions: list[list[str]] | None = None,
                  sandbox: str = "bwrap") -> dict:
    """Score a ``kind: code`` task: ``pass@k`` for each k in the task (see the module docstring).

    `completions` (one list of n_samples strings per problem) skips generation — for scoring saved outputs.
    `sandbox`: ``bwrap`` (default; refused with one line where it cannot run) or ``unsafe_inprocess``.
    """
    require_code_execution(task.name, allow_code_execution, sandbox)
    spec = task.spec
    problems = _problems(task, limit)
    n = spec.n_samples
    if completions is None:
        if spec.use_chat:
            prompts = [template.generation_prompt([{"role": "user", "content":
                       "Complete this Python function. Reply with the full function in a ```python block.\n\n"
                       f"```python\n{p['prompt']}```"}]) for p in problems]
        else:
            prompts = [p["prompt"] for p in problems]
        stop = spec.stops + ([s for s in template.stop_strings if s] if spec.use_chat else [])
        flat = complete(model, tokenizer, [p for p in prompts for _ in range(n)], max_new_tokens=spec.new_tokens,
                        stop=stop, do_sample=n > 1, temperature=spec.temperature, top_p=spec.top_p,
                        batch_size=spec.batch_size)
        if spec.use_chat:
            flat = ["\n" + extract_code(c) for c in flat]
        completions = [flat[i * n:(i + 1) * n] for i in range(len(problems))]
    if len(completions) != len(problems) or any(len(c) != n for c in completions):
        raise ValueError(f"expected {n} completions for each of {len(problems)} problems")
    results = judge_completions([(p, c) for p, cs in zip(problems, completions) for c in cs], timeout=spec.timeout,
                                memory_mb=spec.memory_mb, workers=spec.workers, sandbox=sandbox)
    per_problem, statuses = [], {"passed": 0, "failed": 0, "timeout": 0}
    for i, p in enumerate(problems):
        rs = results[i * n:(i + 1) * n]
        for r in rs:
            statuses[r.status] += 1
        per_problem.append((p, completions[i], rs, sum(r.passed for r in rs)))
    metrics = {f"pass@{k}": sum(pass_at_k(n, c, k) for *_, c in per_problem) / len(problems)
               for k in sorted(set(spec.k))}
    samples = [{"task_id": p["task_id"], "completion": cs[0], "status": rs[0].status,
                "output": rs[0].output[-500:], "correct": c} for p, cs, rs, c in per_problem[:3]]
    k0 = min(spec.k)
    items = [{"id": item_id(task.name, i, p), "score": pass_at_k(n, c, k0), "passed": c, "n_samples": n,
              "text": cs[0]} for i, (p, cs, rs, c) in enumerate(per_problem)]
    return {"n": len(problems), "metrics": metrics, "primary": f"pass@{k0}", "items": items,
            "higher_is_better": {m: True for m in metrics},
            "details": {"n_samples": n, "programs": statuses, "isolation": isolation(sandbox),
                        "reward_hacking_attempts": sum(r.flagged is not None for r in results)},
            "samples": samples}

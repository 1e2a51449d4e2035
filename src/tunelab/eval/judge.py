"""Verdicts on model-written code from outside its reach: the test runs in a process the candidate cannot touch.

A HumanEval-format problem is judged by two sandboxed processes (`sandbox.launch`), started together:

    candidate   exec(prompt + completion); then answers calls  entry_point(*args) → value, one per frame
    judge       exec(prompt + test);       then check(proxy)   — the proxy sends each call to the candidate

joined only by two pipes. The judge runs the dataset's asserts on *plain data* it decoded itself (None, bool,
numbers, str, bytes, list, tuple, dict, set — see sandbox_child.py), never on the candidate's objects, so:

- printing, ``os._exit(0)``, ``sys.exit``, killing itself, patching ``os._exit``/``traceback``/``builtins``,
  reading ``sys.modules['__main__']`` or ``gc.get_objects()`` all act on the candidate's process only: the
  judge then sees a dead pipe or an exception, and the verdict is "failed";
- an object whose ``__eq__`` always says True never reaches the judge: only its plain-data form would.

"passed" = the judge's process exited 0, i.e. ``check`` returned; the candidate's exit status is used only to
tell a CPU-limit death ("timeout") from other failures. Both sandboxes are killed at the end, whatever happened.

What changes for the test: arguments are copied, so a test that checks an argument the candidate mutated in
place sees the original; a candidate must return plain data (numpy values are converted by ``tolist``).
Cost: two sandbox starts per candidate (~30–40 ms on a 2-core machine), run concurrently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from .sandbox import SandboxResult, check_sandbox, kill, launch, ran_too_long

GRACE = 1.0  # seconds the candidate gets to exit on its own after the judge is done (to read its status)


def run_tests(candidate: str, prelude: str, test: str, entry_point: str, *, timeout: float = 5.0,
              memory_mb: int = 1024, mode: str = "bwrap", check: str = "check") -> SandboxResult:
    """Judge `candidate` (prompt + completion) by ``check(entry_point)`` from `test`, with `prelude` (the
    problem's prompt: helpers the test may call) run beside the test. Never raises for the candidate's faults."""
    check_sandbox(mode)
    base = tempfile.mkdtemp(prefix="tunelab-judge-")
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    t0 = time.perf_counter()
    timed_out = False
    procs: list[subprocess.Popen] = []
    try:
        os.mkdir(os.path.join(base, "c"))
        os.mkdir(os.path.join(base, "j"))
        with open(os.path.join(base, "candidate.log"), "w+b") as clog, \
                open(os.path.join(base, "judge.log"), "w+b") as jlog:
            cand = launch(mode, "candidate", {"source": candidate, "entry": entry_point}, timeout, memory_mb,
                          log=clog, scratch=os.path.join(base, "c"), fds=(calls_r, replies_w))
            procs.append(cand)
            spec = {"prelude": prelude, "test": test, "check": check, "entry": entry_point}
            judge = launch(mode, "judge", spec, timeout, memory_mb, log=jlog, scratch=os.path.join(base, "j"),
                           fds=(replies_r, calls_w))
            procs.append(judge)
            for fd in (calls_r, calls_w, replies_r, replies_w):  # only the two children hold the pipes now
                os.close(fd)
            calls_r = calls_w = replies_r = replies_w = -1
            try:
                judge.wait(timeout=max(0.0, timeout - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                timed_out = True
            judged = judge.returncode
            try:
                cand.wait(timeout=GRACE)
            except subprocess.TimeoutExpired:
                pass
            cand_rc = cand.returncode
            for p in procs:
                kill(p)
            procs = []
            clog.seek(0)
            jlog.seek(0)
            output = _tail(clog.read()) + _tail(jlog.read())
    finally:
        for p in procs:
            kill(p)
        for fd in (calls_r, calls_w, replies_r, replies_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)
    seconds = time.perf_counter() - t0
    if not timed_out and judged == 0:
        return SandboxResult("passed", output, seconds)
    if timed_out or ran_too_long(cand_rc):
        return SandboxResult("timeout", output, seconds)
    return SandboxResult("failed", output, seconds)


def _tail(data: bytes, n: int = 1000) -> str:
    return data.decode("utf-8", "replace")[-n:]


def run_tests_many(jobs: list[dict], *, timeout: float = 5.0, memory_mb: int = 1024, workers: int = 2,
                   mode: str = "bwrap") -> list[SandboxResult]:
    """`run_tests` over ``[{candidate, prelude, test, entry_point}, ...]``, `workers` at a time."""
    check_sandbox(mode)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda j: run_tests(j["candidate"], j["prelude"], j["test"], j["entry_point"],
                                                 timeout=timeout, memory_mb=memory_mb, mode=mode), jobs))

"""Verdicts on model-written code from outside its reach: the test runs in a process the candidates cannot touch.

HumanEval-format completions are judged in batches by sandboxed processes (`sandbox.launch`):

    candidate × n   exec(prompt + completion); then answers calls  entry_point(*args) → value, one per frame
    judge × 1       exec(its prompt + test) afresh for each candidate in turn, then check(proxy): each call
                    of the proxy goes to that candidate's process, with `timeout` seconds per candidate

joined only by a pair of pipes per candidate. The judge runs the dataset's asserts on *plain data* it decoded
itself (None, bool, numbers, str, bytes, list, tuple, dict, set — see sandbox_child.py), never on a
candidate's objects, so:

- printing, ``os._exit(0)``, ``sys.exit``, killing itself, patching ``os._exit``/``traceback``/``builtins``,
  reading ``sys.modules['__main__']`` or ``gc.get_objects()`` all act on the candidate's own process: the
  judge then sees a dead pipe or an exception, and the verdict is "failed";
- an object whose ``__eq__`` always says True never reaches the judge: only its plain-data form would.

The judge writes one verdict line per candidate to a pipe only the parent reads ("timeout" when that
candidate's `timeout` seconds ran out); the candidate's exit status is used only to tell a CPU-limit death
(SIGXCPU: "timeout") from other failures. Every process is killed at the end.

What changes for the test: arguments are copied, so a test that checks an argument the candidate mutated in
place sees the original; a candidate must return plain data (numpy values are converted by ``tolist``);
module-level state of the judge (say ``random``'s) is shared by the candidates of one batch, in order.
Cost: one sandbox per candidate plus one judge per batch of up to `BATCH` candidates (README, "Code
sandbox", has the measured per-candidate time).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from .sandbox import SandboxResult, check_sandbox, kill, launch

BATCH = 8  # candidates of one problem per judge: fewer judge starts, bounded processes alive at once
GRACE = 0.5  # seconds a failed candidate gets to exit on its own (to tell a CPU-limit death from the rest)


def run_tests(candidate: str, prelude: str, test: str, entry_point: str, *, timeout: float = 5.0,
              memory_mb: int = 1024, mode: str = "bwrap", check: str = "check") -> SandboxResult:
    """Judge `candidate` (prompt + completion) by ``check(entry_point)`` from `test`, with `prelude` (the
    problem's prompt: helpers the test may call) run beside the test. Never raises for the candidate's faults."""
    job = {"candidate": candidate, "prelude": prelude, "test": test, "entry_point": entry_point, "check": check}
    return run_batch([job], timeout=timeout, memory_mb=memory_mb, mode=mode)[0]


def run_batch(jobs: list[dict], *, timeout: float = 5.0, memory_mb: int = 1024,
              mode: str = "bwrap") -> list[SandboxResult]:
    """`run_tests` for several ``{candidate, prelude, test, entry_point[, check]}``: one sandbox per candidate,
    one judge for them all, which takes them in turn with `timeout` seconds each."""
    check_sandbox(mode)
    candidates = [j["candidate"] for j in jobs]
    base = tempfile.mkdtemp(prefix="tunelab-judge-")
    n = len(candidates)
    owned: list[int] = []  # pipe ends still open in this process

    def pipe() -> tuple[int, int]:
        r, w = os.pipe()
        owned.extend((r, w))
        return r, w

    procs: list[subprocess.Popen] = []
    results: list[SandboxResult | None] = [None] * n
    logs: list = []
    t0 = time.perf_counter()
    try:
        judge_fds, cand_fds = [], []
        for _ in range(n):
            calls_r, calls_w = pipe()
            replies_r, replies_w = pipe()
            judge_fds += [replies_r, calls_w]
            cand_fds.append((calls_r, replies_w))
        verdict_r, verdict_w = pipe()
        logs += [open(os.path.join(base, name), "w+b") for name in [*(f"c{i}.log" for i in range(n)), "judge.log"]]
        jlog = logs[-1]
        cands = []
        for i, (source, fds) in enumerate(zip(candidates, cand_fds)):
            os.mkdir(scratch := os.path.join(base, f"c{i}"))
            cands.append(launch(mode, "candidate", {"source": source, "entry": jobs[i]["entry_point"]}, timeout,
                                memory_mb, log=logs[i], scratch=scratch, fds=fds))
            procs.append(cands[-1])
        os.mkdir(os.path.join(base, "j"))
        spec = {"timeout": timeout, "jobs": [{"prelude": j["prelude"], "test": j["test"], "entry": j["entry_point"],
                                              "check": j.get("check", "check")} for j in jobs]}
        judge = launch(mode, "judge", spec, timeout, memory_mb, log=jlog, scratch=os.path.join(base, "j"),
                       fds=(*judge_fds, verdict_w), busy=n)
        procs.append(judge)
        for fd in owned[:]:
            if fd != verdict_r:  # only the children hold the pipes now: a dead peer is an EOF
                os.close(fd)
                owned.remove(fd)
        deadline = time.monotonic() + n * (timeout + 1.0) + 5.0  # the judge keeps its own per-candidate clock
        for line in _lines(verdict_r, deadline):
            v = json.loads(line)
            i = v["i"]
            cand = cands[i]
            try:
                cand.wait(timeout=GRACE if v["status"] == "failed" else 0)
            except subprocess.TimeoutExpired:
                pass
            # the judge's own clock says "timeout"; a candidate that burnt its CPU seconds first (threads) also ran
            # too long — SIGXCPU only: SIGKILL may be its own doing
            cpu_limited = cand.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
            status = "timeout" if v["status"] == "failed" and cpu_limited else v["status"]
            kill(cand)
            logs[i].seek(0)
            results[i] = SandboxResult(status, _tail(logs[i].read()) + v["message"][-1000:],
                                       time.perf_counter() - t0)
        jlog.seek(0)
        judge_log = _tail(jlog.read())
        for i in range(n):  # the judge died or ran out of time before reaching these
            if results[i] is None:
                timed_out = time.monotonic() >= deadline
                results[i] = SandboxResult("timeout" if timed_out else "failed", judge_log, time.perf_counter() - t0)
    finally:
        for p in procs:
            kill(p)
        for fd in owned:
            os.close(fd)
        for f in logs:
            f.close()
        shutil.rmtree(base, ignore_errors=True)
    return results


def _lines(fd: int, deadline: float):
    """Lines from `fd` until EOF or `deadline`."""
    import select

    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        yield from lines


def _tail(data: bytes, n: int = 1000) -> str:
    return data.decode("utf-8", "replace")[-n:]


def run_tests_many(jobs: list[dict], *, timeout: float = 5.0, memory_mb: int = 1024, workers: int = 2,
                   mode: str = "bwrap") -> list[SandboxResult]:
    """`run_tests` over ``[{candidate, prelude, test, entry_point}, ...]`` in batches of up to `BATCH` (one
    judge each), `workers` batches at a time; results in the jobs' order."""
    check_sandbox(mode)
    size = max(1, min(BATCH, -(-len(jobs) // max(1, workers))))  # small inputs: keep every worker busy
    batches = [jobs[k:k + size] for k in range(0, len(jobs), size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [r for out in pool.map(lambda b: run_batch(b, timeout=timeout, memory_mb=memory_mb, mode=mode),
                                      batches) for r in out]

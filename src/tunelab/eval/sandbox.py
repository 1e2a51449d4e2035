"""Run model-written Python in a contained subprocess, and tell only a clean, complete run apart as "passed".

Code a model wrote may loop forever, eat all memory, delete files or phone home — by accident far more often
than by design. Each program runs in a fresh ``python -I`` subprocess with these layers:

1. **Its own temp dir** as cwd, HOME and TMPDIR; removed afterwards.
2. **A scrubbed environment**: only PATH, HOME, TMPDIR, LANG and single-thread settings for math libraries —
   no tokens, keys or proxies from the caller's environment. ``-I`` also ignores PYTHON* variables and the
   user's site-packages.
3. **Resource limits** (set by the child on itself before the program runs, so no thread-unsafe
   ``preexec_fn`` is needed in the caller): CPU seconds, address space (``memory_mb``), file size, no core
   dumps. Soft = hard, so the program cannot raise them again.
4. **A wall-clock timeout**: the child leads its own process group, and the whole group is killed.
5. **An audit hook** (PEP 578), installed before the program's first line and impossible to remove from
   Python, that refuses: socket creation (no network), starting processes (``subprocess``, ``os.system``,
   ``fork``, ``exec*``), ``ctypes``, signalling other processes, changing rlimits, and *writing* anything
   outside the temp dir (``open`` for writing, remove, rename, mkdir, chmod, …). Reading is allowed: imports
   need it. Importing ``_ctypes`` and ``_posixsubprocess`` raises ImportError, so ``import subprocess`` and
   ``import ctypes`` fail while libraries that treat ctypes as optional (numpy) still import.
6. **A network namespace** when the machine allows unprivileged ones (``unshare --user --net``): even a
   socket made some other way has no interface to reach anything through.

A run *passes* only if the program finished without an exception and the runner then printed a random
nonce it read from stdin before the program started — so ``sys.exit(0)``/``os._exit(0)`` before the tests
is a failure, not a pass. Everything else is ``failed`` or ``timeout``.

This is containment for careless code, not a security boundary against code written to escape (CPython can
be subverted from inside the process); run untrusted benchmarks inside a VM or container as well.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

OUTPUT_LIMIT = 1 << 20  # bytes of stdout/stderr a program may write (enforced by RLIMIT_FSIZE on its log file)

# Executed by `python -I -c`; receives: timeout, memory limit (bytes), file size limit, on argv; the nonce on
# stdin. Kept free of f-string interpolation so the guard is plain Python that can be read as is.
RUNNER = r'''
import os, sys, resource, traceback
def _setup():
    cpu, mem, fsize = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    nonce = sys.stdin.readline().strip()
    for lim, val in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(lim, (val, val))
    try:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    except (ValueError, OSError):
        pass  # macOS cannot cap the address space; the CPU and wall-clock limits still stop runaway programs
    root = os.path.realpath(os.getcwd())
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    O_WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    blocked = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
               "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.", "pty.",
               "resource.setrlimit", "resource.prlimit", "sys.remote_exec")
    blocked_imports = {"_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_interpreters"}
    # event -> indices of arguments that name paths being written
    writes = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
              "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
              "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
              "os.chflags": (0,), "os.lchflags": (0,), "shutil.rmtree": (0,), "shutil.chown": (0,),
              "sqlite3.connect": (0,)}
    busy = [False]

    def inside(path):
        if isinstance(path, int) or path is None:
            return True  # an already-open descriptor: it passed this check when it was opened
        p = fsdecode(path)
        if p in (":memory:", "", "/dev/null"):
            return True
        p = realpath(p)
        return p == root or p.startswith(root + sep)

    def hook(event, args):
        if busy[0]:
            return  # our own realpath() calls
        busy[0] = True
        try:
            if event.startswith(blocked):
                raise PermissionError("sandbox: '%s' is not allowed" % event)
            if event == "import" and args[0] in blocked_imports:
                raise ImportError("sandbox: importing %s is not allowed" % args[0])
            if event == "open":
                path, mode, flags = args
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                          (isinstance(flags, int) and flags & O_WRITE)
                if writing and not inside(path):
                    raise PermissionError("sandbox: writing %s outside the sandbox directory" % (path,))
            elif event in writes:
                for i in writes[event]:
                    if i < len(args) and not inside(args[i]):
                        raise PermissionError("sandbox: %s on %s outside the sandbox directory" % (event, args[i]))
        finally:
            busy[0] = False

    sys.addaudithook(hook)
    return code, nonce

_code, _nonce = _setup()
del _setup
try:
    exec(_code, {"__name__": "__sandbox__", "__builtins__": __builtins__})
except BaseException:
    try:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(1)
sys.stdout.write("\n" + _nonce + "\n")
sys.stdout.flush()
os._exit(0)
'''


@dataclass
class SandboxResult:
    """``status`` is passed | failed | timeout; ``output`` is the tail of what the program printed."""

    status: str
    output: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Can this machine run a command in a fresh, unprivileged user+network namespace?"""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--net", "true"], timeout=10,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def isolation() -> dict:
    """Which layers are active on this machine (recorded with code results)."""
    return {"audit_hook": True, "rlimits": True, "scrubbed_env": True, "temp_dir": True,
            "network_namespace": network_namespace_available() and os.environ.get("TUNELAB_SANDBOX_UNSHARE") != "0"}


def _env(tmp: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_sandboxed(program: str, timeout: float = 5.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `program` (Python source) under the layers in the module docstring; never raises for its faults."""
    base = tempfile.mkdtemp(prefix="tunelab-sandbox-")
    work = os.path.join(base, "work")  # the only writable place; the log lives beside it, out of reach
    os.mkdir(work)
    log_path = os.path.join(base, "output.log")
    nonce = secrets.token_hex(16)
    with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
        f.write(program)
    cpu = max(1, math.ceil(timeout)) + 1  # CPU cap just above the wall clock: catches busy loops on its own
    cmd = [sys.executable, "-I", "-B", "-c", RUNNER, str(cpu), str(memory_mb << 20), str(OUTPUT_LIMIT)]
    if isolation()["network_namespace"]:
        cmd = ["unshare", "--user", "--map-root-user", "--net", "--"] + cmd
    t0 = time.perf_counter()
    timed_out = False
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=work, env=_env(work), stdin=subprocess.PIPE, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.stdin.write((nonce + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the child already died; its exit status tells the story
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
        with open(log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in text.splitlines() if ln.strip()]
    rc = proc.returncode
    if not timed_out and rc == 0 and lines and lines[-1].strip() == nonce:
        return SandboxResult("passed", "\n".join(lines[:-1])[-2000:], seconds)
    # SIGXCPU (CPU limit) and SIGKILL (the group kill, or the hard CPU limit) both mean "ran too long".
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult("timeout", text[-2000:], seconds)
    return SandboxResult("failed", text.replace(nonce, "")[-2000:], seconds)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_many(programs: list[str], timeout: float = 5.0, memory_mb: int = 1024, workers: int = 2) -> list[SandboxResult]:
    """`run_sandboxed` over many programs, `workers` at a time (threads only wait on subprocesses)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_sandboxed(p, timeout, memory_mb), programs))

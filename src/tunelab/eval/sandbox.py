"""Run model-written Python behind an operating-system boundary: bubblewrap namespaces, not Python checks.

In RL the code is written by a policy that is *rewarded* for passing, so it is adversarial by construction:
whatever scores will be found. Each process runs under ``bwrap`` (bubblewrap, the sandbox Flatpak uses):

- **Filesystem**: a fresh root holding only read-only binds of ``/usr`` (with the ``/bin``, ``/lib*``
  links), ``/etc/ld.so.cache`` and the Python installation in use. ``/etc``, ``/root``, ``/home``, the run
  folders and the rest of the machine are simply absent. The only writable place is a private tmpfs at
  ``/tmp`` (the working directory) of ``TMPFS_MB`` in all: the total-bytes limit, with RLIMIT_FSIZE per file.
- **Namespaces**: new PID (nothing outside can be seen or signalled, and when the sandbox's first process
  ends the kernel kills everything left in it, ``setsid`` grandchildren included), network (no interface
  but a downed loopback: no network, and no abstract or outside AF_UNIX sockets), IPC, UTS, cgroup, mount;
  ``/proc`` and ``/dev`` are private (``/dev`` holds only null, zero, random, urandom, tty, pts).
- **Identity**: as root, bwrap keeps only CAP_SETUID/SETGID and the child drops to a uid no other process
  uses (so RLIMIT_NPROC is enforced — the kernel exempts uid 0 — and files owned by root are unreadable);
  otherwise a user namespace with all capabilities dropped. ``no_new_privs`` is set: setuid binaries and
  file capabilities cannot raise privileges again. ``--new-session`` (no terminal injection),
  ``--die-with-parent``, ``--clearenv`` with a minimal environment.
- **Limits** (soft = hard, set before the first untrusted line): CPU seconds, address space, file size,
  processes (``NPROC``, threads included), open files, no core dumps; plus a wall-clock timeout that kills
  the outer bwrap, which takes the whole namespace with it.

What it is not: a VM. The code shares the kernel with the machine (a kernel exploit escapes it); there is no
seccomp filter (and, run as root, nested user namespaces stay allowed: more kernel surface) and no inode cap on
the tmpfs; CPU and memory are limited per process, not by a cgroup (so NPROC × memory_mb in all).

Where bwrap is missing or cannot create namespaces (a probe run, cached, decides), model-written code is
refused with one line, unless the caller explicitly chose ``sandbox="unsafe_inprocess"``: a plain subprocess
with the same rlimits and a PEP 578 audit hook in the same process as the code — containment for careless
code, which code written to escape defeats.

Verdicts on code tasks come from `judge.py` (the test runs in a second sandbox and only sees plain data);
`run_sandboxed` runs one whole program, whose "passed" (ran to its end) is that program's own word.
"""

from __future__ import annotations

import json
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
from pathlib import Path

from ..errors import TunelabError

MODES = ("bwrap", "unsafe_inprocess")
OUTPUT_LIMIT = 1 << 20  # bytes of stdout/stderr (and of any one file) a program may write: RLIMIT_FSIZE
TMPFS_MB = 32  # the whole writable space of one sandbox, in RAM (8 candidates × `workers` may be alive at once)
# processes + threads one sandbox may have (a uid of its own, so this is per sandbox); memory is capped per
# process, so NPROC × memory_mb bounds a sandbox's total
NPROC = 16
NOFILE = 64
CHILD = Path(__file__).with_name("sandbox_child.py").read_text(encoding="utf-8")
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"
_SIGNALLED = {signal.SIGXCPU, signal.SIGKILL}  # CPU limit / hard CPU limit or our kill: "ran too long"


@dataclass
class SandboxResult:
    """``status`` is passed | failed | timeout; ``output`` is the tail of what the program printed;
    ``flagged`` names what the static screen (`screen.py`) found, when it refused to run the code."""

    status: str
    output: str
    seconds: float
    flagged: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def probe() -> str | None:
    """None when bubblewrap can build the sandbox on this machine, else why not (cached for the process)."""
    if not sys.platform.startswith("linux"):
        return "bubblewrap needs Linux"
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        proc = subprocess.run(_command("bwrap", {"role": "probe", **_limits(5.0, 256)}), capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"bwrap failed to start ({e})"
    out = proc.stdout.decode(errors="replace").strip()
    if proc.returncode == 0 and out.endswith(" ok"):
        return None
    why = (proc.stderr.decode(errors="replace").strip().splitlines() or [out or f"exit status {proc.returncode}"])[-1]
    return f"bwrap cannot create its sandbox here ({why})"


def check_sandbox(mode: str) -> None:
    """Raise `TunelabError` (one line) unless code can run in `mode` on this machine."""
    if mode not in MODES:
        raise TunelabError(f"unknown sandbox '{mode}' (choose {' or '.join(MODES)})")
    if mode == "bwrap" and (why := probe()) is not None:
        raise TunelabError(f"refusing to run model-written code without an OS sandbox: {why}; {INSTALL_HINT}, or "
                           "accept the weaker Python-level guard with eval.sandbox: unsafe_inprocess "
                           "(tunelab eval: --sandbox unsafe_inprocess)")


def isolation(mode: str = "bwrap") -> dict:
    """What guards the code in `mode` (recorded with code-task results)."""
    if mode == "bwrap":
        return {"sandbox": "bwrap", "namespaces": "pid,net,ipc,uts,mount,cgroup", "root": "read-only, minimal",
                "tmpfs_mb": TMPFS_MB, "rlimits": "cpu,as,fsize,nproc,nofile", "verdict": "separate judge process"}
    return {"sandbox": "unsafe_inprocess", "guard": "audit hook in the code's own process", "rlimits": True,
            "verdict": "separate judge process"}


def _limits(timeout: float, memory_mb: int) -> dict:
    cpu = max(1, math.ceil(timeout)) + 1  # CPU cap just above the wall clock: catches busy loops on its own
    return {"cpu": cpu, "mem": memory_mb << 20, "fsize": OUTPUT_LIMIT, "nproc": NPROC, "nofile": NOFILE}


def _env(home: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _python_roots() -> list[str]:
    """The folders the interpreter needs (venv and base installation), outside /usr, deduplicated."""
    found = []
    for p in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable),
              os.path.dirname(os.path.realpath(sys.executable))):
        p = os.path.realpath(p)
        if not p.startswith("/usr/") and p != "/usr" and not any(p == f or p.startswith(f + "/") for f in found):
            found = [f for f in found if not f.startswith(p + "/")] + [p]
    return found


@lru_cache(maxsize=1)
def _has_disable_userns() -> bool:
    """bwrap >= 0.8 can forbid nested user namespaces (less kernel surface); older ones lack the flag."""
    try:
        return "--disable-userns" in subprocess.run(["bwrap", "--help"], capture_output=True, text=True).stdout
    except OSError:
        return False


def _bwrap_prefix() -> list[str]:
    args = ["bwrap", "--die-with-parent", "--new-session", "--clearenv", "--unshare-ipc", "--unshare-pid",
            "--unshare-net", "--unshare-uts", "--unshare-cgroup-try", "--ro-bind", "/usr", "/usr"]
    if os.geteuid() == 0:  # privileged bwrap; the child drops to its own uid (see the module docstring)
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--cap-drop", "ALL"] + (["--disable-userns"] if _has_disable_userns() else [])
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    made = set()
    for root in _python_roots():
        parents = Path(root).parents
        for parent in reversed([str(p) for p in parents if str(p) != "/"]):
            if parent not in made:  # world-traversable, whatever the host's mode (/root is 0700)
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", root, root]
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(TMPFS_MB << 20), "--tmpfs",
             "/tmp", "--chdir", "/tmp"]
    for k, v in _env("/tmp").items():
        args += ["--setenv", k, v]
    return args


def _command(mode: str, cfg: dict) -> list[str]:
    if mode == "bwrap":
        if os.geteuid() == 0:
            cfg = {**cfg, "uid": secrets.randbelow(1 << 30) + (1 << 30)}
        return _bwrap_prefix() + [sys.executable, "-I", "-B", "-c", CHILD, json.dumps(cfg)]
    return [sys.executable, "-I", "-B", "-c", CHILD, json.dumps({**cfg, "guard": True})]


def launch(mode: str, role: str, payload: dict | None, timeout: float, memory_mb: int, *, log, scratch: str,
           fds: tuple[int, ...] = (), busy: int = 1) -> subprocess.Popen:
    """Start one sandboxed process in `role` (see sandbox_child.py), hand it `payload` on stdin.

    `log` (an open file) takes its stdout and stderr; `scratch` is a host folder that is its working
    directory in ``unsafe_inprocess`` mode (bwrap gives it a private tmpfs instead); `fds` are the pipe ends
    it talks through (judge ↔ candidates); a judge of `busy` candidates gets `busy` times the CPU seconds.
    """
    cfg = {"role": role, **_limits(timeout, memory_mb), **({"fds": list(fds)} if fds else {})}
    cfg["cpu"] *= busy
    cfg["nofile"] += len(fds)
    proc = subprocess.Popen(_command(mode, cfg), cwd=scratch, env=_env(scratch), stdin=subprocess.PIPE, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, pass_fds=fds)
    try:
        proc.stdin.write(json.dumps(payload).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it already died; its exit status tells the story
    return proc


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group; for bwrap that is the outer process, whose death (``--die-with-parent``)
    kills the namespace's first process and with it every process inside."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def ran_too_long(rc: int | None) -> bool:
    """Exit status of a process stopped by the CPU limit: -sig directly, 128+sig through bwrap."""
    return rc is not None and (-rc in _SIGNALLED or rc - 128 in _SIGNALLED)


def run_sandboxed(program: str, timeout: float = 5.0, memory_mb: int = 1024, mode: str = "bwrap") -> SandboxResult:
    """Run a whole `program` (Python source) in the sandbox; "passed" = it ran to its end (exit status 0 after
    printing a nonce), which careless code cannot reach by ``sys.exit(0)`` but hostile code can fake: for
    verdicts on model-written code use `judge.run_tests`. Never raises for the program's faults."""
    check_sandbox(mode)
    base = tempfile.mkdtemp(prefix="tunelab-sandbox-")
    scratch = os.path.join(base, "work")  # unsafe_inprocess: its cwd; the log lives beside it, out of reach
    os.mkdir(scratch)
    nonce = secrets.token_hex(16)
    t0 = time.perf_counter()
    timed_out = False
    try:
        with open(os.path.join(base, "output.log"), "w+b") as log:
            proc = launch(mode, "program", {"source": program, "nonce": nonce}, timeout, memory_mb, log=log,
                          scratch=scratch)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            rc = proc.returncode
            kill(proc)
            log.seek(0)
            text = log.read().decode("utf-8", "replace")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not timed_out and rc == 0 and lines and lines[-1].strip() == nonce:
        return SandboxResult("passed", "\n".join(lines[:-1])[-2000:], seconds)
    if timed_out or ran_too_long(rc):
        return SandboxResult("timeout", text[-2000:], seconds)
    return SandboxResult("failed", text.replace(nonce, "")[-2000:], seconds)


def run_many(programs: list[str], timeout: float = 5.0, memory_mb: int = 1024, workers: int = 2,
             mode: str = "bwrap") -> list[SandboxResult]:
    """`run_sandboxed` over many programs, `workers` at a time (threads only wait on subprocesses)."""
    check_sandbox(mode)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_sandboxed(p, timeout, memory_mb, mode), programs))


SELF_CHECK = r'''
import os, socket, sys
def attempt(name, fn):
    try:
        fn()
        print("ESCAPED", name)
    except OSError as e:
        print("held", name, "(%s)" % e.__class__.__name__)
attempt("write to the read-only root", lambda: open(os.path.join(sys.prefix, "tunelab-check"), "w"))
attempt("read /etc/shadow", lambda: open("/etc/shadow").read())
attempt("list /home", lambda: os.listdir("/home"))
attempt("reach the network", lambda: socket.create_connection(("1.1.1.1", 53), timeout=2))
attempt("signal tunelab's own process", lambda: os.kill(HOST_PID, 0))
print("pids visible:", len([p for p in os.listdir("/proc") if p.isdigit()]), "uid:", os.getuid())
'''


def self_check() -> int:
    """``tunelab sandbox``: can this machine run the sandbox, and does it hold? Prints what it tried; 0 = yes."""
    why = probe()
    if why is not None:
        print(f"no OS sandbox: {why}; {INSTALL_HINT}")
        return 1
    res = run_sandboxed(SELF_CHECK.replace("HOST_PID", str(os.getpid())), timeout=10, memory_mb=512)
    print(f"bubblewrap sandbox works here: {json.dumps(isolation())}\n{res.output.strip()}")
    return 0 if res.passed and "ESCAPED" not in res.output else 1

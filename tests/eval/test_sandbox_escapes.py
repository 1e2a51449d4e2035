"""Issue 28 §1: each escape that beat the old Python-level sandbox, run for real against the bubblewrap sandbox.

Every case is a completion of a toy problem whose answer is wrong (``return None``): the escape is its only
way to a pass, or its point is damage outside. Each is asserted *contained* (checked from the host: files,
processes, sockets) and *scored as a failure* — run straight through the judge (`judge.run_tests`, no static
screen, so the OS boundary alone is tested) and through the ``code_tests`` reward (screen + judge) → 0.0.

Where bubblewrap cannot run on the machine, the cases cannot run; the test checks the one-line refusal instead.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from tunelab.errors import TunelabError
from tunelab.eval import sandbox
from tunelab.eval.judge import run_tests, run_tests_many
from tunelab.eval.screen import flag
from tunelab.rl.rewards import RewardInputs, build_rewards

WHY_NOT = sandbox.probe()
needs_bwrap = pytest.mark.skipif(WHY_NOT is not None, reason=f"no OS sandbox here ({WHY_NOT}); "
                                 "test_refused_without_bubblewrap checks the refusal instead")
PROMPT = "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n"
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
PROBLEM = {"task_id": "Toy/0", "prompt": PROMPT, "test": TEST, "entry_point": "add"}


def body(code: str) -> str:
    """`code` as the body of add() (a HumanEval continuation), ending with a wrong answer."""
    return "".join("    " + ln + "\n" for ln in code.strip("\n").splitlines()) + "    return None\n"


def escapes(out: str, victim_pid: int, unix_path: str, abstract: str, tag: str) -> dict[str, str]:
    """name → completion. `out` is a host folder the escapes try to write into (the sandbox must not see it)."""
    return {
        "dir_fd": body(f"""
import os, sys
for place in ({out!r}, sys.prefix, '/usr'):
    try:
        d = os.open(place, os.O_RDONLY)
        for i in range(50):
            fd = os.open('fill%d.bin' % i, os.O_WRONLY | os.O_CREAT, dir_fd=d)
            os.write(fd, b'x' * (1 << 20))
        os.unlink('keep.txt', dir_fd=d)
        os.rename('keep.txt', 'moved.txt', src_dir_fd=d, dst_dir_fd=d)
    except OSError as e:
        print('blocked', place, e)
"""),
        "sqlite_attach": body(f"""
import sqlite3, sys
for place in ({out!r}, sys.prefix):
    try:
        db = sqlite3.connect(':memory:')
        db.execute("ATTACH DATABASE '%s/evil.db' AS e" % place)
        db.execute('CREATE TABLE e.t (x)')
        db.commit()
    except sqlite3.Error as e:
        print('blocked', place, e)
"""),
        "gc_guard_off_then_shell": body(f"""
import gc, subprocess
hooks = [o for o in gc.get_objects() if callable(o) and getattr(o, '__name__', '') == 'hook']
subprocess.run(['/bin/sh', '-c', 'echo pwned > {out}/shell.txt; echo pwned > /usr/pwned.txt'])
"""),
        "ctypes_system": body(f"""
import ctypes
ctypes.CDLL(None).system(b'echo pwned > {out}/ctypes.txt; echo pwned > /usr/ctypes.txt')
"""),
        "unix_socket_outside": body(f"""
import socket
for addr in ({unix_path!r}, {abstract!r}):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(addr)
        s.sendall(b'escaped')
    except OSError as e:
        print('blocked', repr(addr), e)
"""),
        "fork_200": body("""
import os, time
for i in range(200):
    if os.fork() == 0:
        time.sleep(5)
        os._exit(0)
"""),
        "setsid_grandchild": body(f"""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv('/bin/sh', ['sh', '-c', 'sleep 2; echo late > {out}/late.txt; sleep 30 # {tag}'])
    os._exit(0)
"""),
        "pidfd_kill_outside": body(f"""
import os, signal
try:
    signal.pidfd_send_signal(os.pidfd_open({victim_pid}), signal.SIGKILL)
except OSError as e:
    print('blocked', e)
try:
    os.kill({victim_pid}, signal.SIGKILL)
except OSError as e:
    print('blocked', e)
"""),
        "kill_itself": body("""
import os, signal
os.kill(os.getpid(), signal.SIGKILL)
"""),
        "chdir_race": body(f"""
import os, threading, time
stop = time.time() + 1.0
def flip():
    while time.time() < stop:
        os.chdir('/')
        os.chdir('/tmp')
threading.Thread(target=flip).start()
while time.time() < stop:
    try:
        open('race-{tag}.txt', 'w').write('escaped')
    except OSError:
        pass
"""),
        "nonce_and_exit": body("""
import os, sys
main = sys.modules['__main__']
print({k: str(v)[:40] for k, v in vars(main).items()})
print('0123456789abcdef0123456789abcdef')
sys.stdout.flush()
os._exit(0)
"""),
        "patch_exit_and_traceback": "    return None\n\nimport os, sys, traceback, builtins\n"
                                    "os._exit = lambda code: None\nsys.exit = lambda *a: None\ntraceback.print_exc = lambda *a, **k: None\n"
                                    "builtins.AssertionError = type('AssertionError', (Exception,), {})\n",
        "always_equal": "    class Eq:\n        def __eq__(self, other):\n            return True\n"
                        "        __hash__ = object.__hash__\n    return Eq()\n",
        "total_bytes": body("""
import time
stop, n = time.time() + 5, 0
while time.time() < stop and n < 1024:
    with open('/tmp/fill%d.bin' % n, 'wb') as f:
        f.write(b'x' * (1 << 20))
    n += 1
print('wrote', n, 'MB')
"""),
        "read_secrets": body(f"""
import os
for path in ('/etc/shadow', '/etc/passwd', '/root/.ssh', '/root/.bash_history', '/home', '/work/wt', '{out}/keep.txt'):
    try:
        print('LEAKED', path, open(path).read(20) if os.path.isfile(path) else os.listdir(path))
    except OSError as e:
        print('blocked', path, type(e).__name__)
"""),
    }


def _host_procs_with(tag: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tag.encode() in f.read():
                    found.append(int(pid))
        except (OSError, ValueError):
            continue
    return found


@needs_bwrap
def test_escapes_are_contained_and_fail(tmp_path, monkeypatch):
    out = tmp_path / "outside"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the judge's host-side folders: must all be removed
    tag = f"tunelab-escape-{uuid.uuid4().hex}"
    unix_path = str(tmp_path / "s.sock")
    listeners = []
    for addr in (unix_path, "\0" + tag):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(addr)
        s.listen(8)
        s.setblocking(False)
        listeners.append(s)
    victim = subprocess.Popen(["sleep", "60"])
    try:
        cases = escapes(str(out), victim.pid, unix_path, "\0" + tag, tag)
        jobs = [{"candidate": PROMPT + c, "prelude": PROMPT, "test": TEST, "entry_point": "add"}
                for c in cases.values()]
        t0 = time.perf_counter()
        results = dict(zip(cases, run_tests_many(jobs, timeout=8.0, memory_mb=512, workers=2)))
        elapsed = time.perf_counter() - t0
        # scored as failures, every one (nothing printed, patched or exited its way to "passed")
        assert {k: r.status for k, r in results.items() if r.passed} == {}
        # contained: nothing written, removed or renamed outside; no socket reached; the victim lives
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
        for s in listeners:
            with pytest.raises(BlockingIOError):
                s.accept()
        assert victim.poll() is None, "a process outside the sandbox was killed"
        assert not os.path.exists(f"/race-{tag}.txt") and not os.path.exists("/usr/pwned.txt")
        assert not os.path.exists("/usr/ctypes.txt")
        # nothing outlives the sandbox: the setsid grandchild died with its PID namespace
        assert _host_procs_with(tag) == []
        time.sleep(2.5)
        assert not (out / "late.txt").exists() and _host_procs_with(tag) == []
        assert list(scratch.iterdir()) == []  # kill_itself left no temp folder behind
        # the limits did the stopping, with the OS's own errors
        assert "BlockingIOError" in results["fork_200"].output  # RLIMIT_NPROC: 200 forks refused
        assert "No space left on device" in results["total_bytes"].output  # the tmpfs's total-bytes cap
        reads = results["read_secrets"].output  # the files are not there at all: only /usr and Python are bound
        assert "LEAKED" not in reads and reads.count("blocked") == 7, reads
        assert elapsed < 60
    finally:
        victim.kill()
        victim.wait()
        for s in listeners:
            s.close()


@needs_bwrap
def test_code_tests_reward_scores_every_escape_zero_and_counts_the_hacks(tmp_path):
    tag = f"tunelab-escape-{uuid.uuid4().hex}"
    cases = escapes(str(tmp_path), 999999, str(tmp_path / "none.sock"), "\0" + tag, tag)
    cases["correct"] = "    return a + b\n"
    batch = RewardInputs(list(cases.values()), [PROBLEM] * len(cases))
    reward = build_rewards([{"name": "code_tests", "timeout": 8.0}], allow_code_execution=True)
    scores = reward(batch)
    got = dict(zip(cases, scores.per_function["code_tests"]))
    assert got.pop("correct") == 1.0
    assert got == {k: 0.0 for k in got}
    # exits and introspection are screened (scored 0 without running) and counted for the step's log
    flagged = {"gc_guard_off_then_shell", "ctypes_system", "pidfd_kill_outside", "kill_itself", "nonce_and_exit",
               "patch_exit_and_traceback", "always_equal", "fork_200", "setsid_grandchild"}  # the last two: os._exit
    assert {k for k, c in cases.items() if flag(PROMPT + c, 3)} == flagged
    assert scores.metrics()["reward_hacking_attempts"] == len(flagged)


def test_refused_without_bubblewrap(monkeypatch, tmp_path):
    """Where bwrap is missing (or cannot create namespaces) model-written code is refused in one line naming
    how to install it and the explicit weaker mode; ``unsafe_inprocess`` is accepted only when asked for."""
    monkeypatch.setattr(sandbox, "probe", lambda: "bubblewrap (bwrap) is not installed")
    from tunelab.eval.code import require_code_execution

    for call in (lambda: require_code_execution("humaneval", True),
                 lambda: build_rewards([{"name": "code_tests"}], allow_code_execution=True),
                 lambda: run_tests(PROMPT + "    return a + b\n", PROMPT, TEST, "add")):
        with pytest.raises(TunelabError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "bubblewrap (bwrap) is not installed" in msg
        assert "apt-get install bubblewrap" in msg and "eval.sandbox: unsafe_inprocess" in msg
    require_code_execution("humaneval", True, "unsafe_inprocess")  # the explicit weaker mode is allowed
    assert run_tests(PROMPT + "    return a + b\n", PROMPT, TEST, "add", mode="unsafe_inprocess").passed
    # ... with the Python-level guard on: careless writes outside and process starts are still refused
    outside = tmp_path / "careless.txt"
    res = sandbox.run_sandboxed(f"open({str(outside)!r}, 'w').write('x')\n", mode="unsafe_inprocess")
    assert res.status == "failed" and "outside the sandbox directory" in res.output and not outside.exists()
    res = sandbox.run_sandboxed("import os\nos.system('true')\n", mode="unsafe_inprocess")
    assert res.status == "failed" and "os.system" in res.output


def test_the_probe_on_this_machine_matches_bwrap():
    """The probe's answer is consistent with the machine: no bwrap binary → a reason naming it."""
    import shutil

    if shutil.which("bwrap") is None:
        assert WHY_NOT == "bubblewrap (bwrap) is not installed"
    elif sys.platform.startswith("linux") and WHY_NOT is None:
        assert sandbox.run_sandboxed("print('inside')", timeout=5).passed


def test_tunelab_sandbox_command(capsys, monkeypatch):
    """`tunelab sandbox`: exit 0 and every attempt 'held' where bwrap works; exit 1 and one line where not."""
    from tunelab.cli import main

    if WHY_NOT is None:
        assert main(["sandbox"]) == 0
        out = capsys.readouterr().out
        assert out.count("held ") == 5 and "ESCAPED" not in out
    monkeypatch.setattr(sandbox, "probe", lambda: "bubblewrap (bwrap) is not installed")
    assert main(["sandbox"]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "apt-get install bubblewrap" in out


def test_eval_sandbox_setting_reaches_the_code_paths(monkeypatch, tmp_path):
    """``eval.sandbox`` is validated by the config, and a run that declares a code task is refused (one line,
    before anything is written) where bwrap cannot run unless it chose unsafe_inprocess."""
    from tunelab.config import load_config
    from tunelab.train.task_eval import check_tasks

    base = ["model.name=tiny", "eval.target=[humaneval]", "eval.allow_code_execution=true"]
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("objective: sft\n")
    with pytest.raises(TunelabError, match="sandbox"):
        load_config(str(cfg_path), base + ["eval.sandbox=firejail"])
    monkeypatch.setattr(sandbox, "probe", lambda: "bubblewrap (bwrap) is not installed")
    with pytest.raises(TunelabError, match="eval.sandbox: unsafe_inprocess"):
        check_tasks(load_config(str(cfg_path), base))
    check_tasks(load_config(str(cfg_path), base + ["eval.sandbox=unsafe_inprocess"]))


def test_tunelab_eval_refuses_code_without_bubblewrap_in_one_line(capsys, monkeypatch):
    from tunelab.cli import main

    monkeypatch.setattr(sandbox, "probe", lambda: "bubblewrap (bwrap) is not installed")
    assert main(["eval", "no-model-needed", "--tasks", "humaneval", "--allow-code-execution"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sandbox unsafe_inprocess" in err and "apt-get install bubblewrap" in err
    assert main(["eval", "no-model-needed", "--tasks", "humaneval"]) == 2  # without the opt-in: the eval switch
    assert "--allow-code-execution (tunelab eval)" in capsys.readouterr().err

"""The Python that runs INSIDE the sandbox — never imported by tunelab: `sandbox.py` passes this file's text to
``python -I -B -c`` (the sandbox holds no copy of tunelab), with one JSON argument.

Trusted prelude, before any untrusted line: rlimits (soft = hard: CPU s, address space, file size, processes,
open files, no core dumps); when started as root inside bubblewrap, drop to an unprivileged uid nobody else
uses (so the kernel's process limit applies and files owned by root stay unreadable; bubblewrap's
no-new-privileges flag keeps it there); in the explicit ``unsafe_inprocess`` mode only, the Python-level
audit-hook guard. Then one of three roles:

``program``    exec a whole program; exit 0 and print the nonce only if it ran to its end (careless code's
               ``sys.exit(0)`` is no pass — but this verdict is the program's own word, see sandbox.py).
``candidate``  exec the model's code, then answer calls ``entry_point(*args)`` read from a pipe, one frame per
               call, with the return value as plain data (or the exception's type and message).
``judge``      for each candidate of its batch in turn: exec the task's trusted prompt + test afresh and run
               ``check(proxy)``, where the proxy forwards each call to that candidate's process (a deadline
               per candidate); then one verdict line (passed | failed | timeout) on a pipe only the parent
               reads. The judge never runs a line of the model's code and decodes only plain data (None,
               bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset): "passed" means
               the asserts ran on values the candidate returned, and held.

Frames: 4-byte big-endian length + JSON. Plain data are tagged so a tuple stays a tuple:
``{"t": [...]}`` tuple, ``{"d": [[k, v], ...]}`` dict, ``{"s": ...}`` set, ``{"fs": ...}`` frozenset,
``{"b": hex}`` bytes, ``{"c": [re, im]}`` complex; lists, str, int, float, bool and None are JSON.
"""
import json
import os
import resource
import sys
import time
import traceback

MAX_FRAME = 16 << 20  # bytes in one reply: more is a failure, not a memory blow-up in the judge
MAX_DEPTH = 200


def encode(x, depth=0):
    """Plain data → JSON-able tagged form (runs in the candidate: may call its methods, e.g. numpy's tolist)."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply to return")
    t = type(x)
    if x is None or t in (bool, int, str):
        return x
    if t is float:
        return x
    if t is list:
        return [encode(v, depth + 1) for v in x]
    if t is tuple:
        return {"t": [encode(v, depth + 1) for v in x]}
    if t is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "fs": [encode(v, depth + 1) for v in x]}
    if t is bytes:
        return {"b": x.hex()}
    if t is complex:
        return {"c": [x.real, x.imag]}
    for base, conv in ((bool, bool), (int, int), (float, float), (str, str), (list, list), (tuple, tuple),
                       (dict, dict), (set, set), (frozenset, frozenset), (bytes, bytes)):
        if isinstance(x, base):  # subclasses (IntEnum, OrderedDict, …) become their plain base
            return encode(conv(x), depth)
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return encode(x.tolist(), depth)
    if hasattr(x, "__index__"):
        return encode(x.__index__(), depth)
    raise TypeError("a %s cannot cross the sandbox (plain data only)" % t.__name__)


def decode(x, depth=0):
    """Tagged form → plain data; anything else is refused (runs in the judge, on bytes the candidate chose)."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list:
        return [decode(v, depth + 1) for v in x]
    if t is dict and len(x) == 1:
        (tag, v), = x.items()
        if type(v) is list:
            if tag == "t":
                return tuple(decode(e, depth + 1) for e in v)
            if tag == "d":
                return {decode(k, depth + 1): decode(e, depth + 1) for k, e in v}
            if tag == "s":
                return {decode(e, depth + 1) for e in v}
            if tag == "fs":
                return frozenset(decode(e, depth + 1) for e in v)
            if tag == "c" and len(v) == 2 and all(type(e) in (int, float) for e in v):
                return complex(v[0], v[1])
        if tag == "b" and type(v) is str:
            return bytes.fromhex(v)
    raise ValueError("malformed value from the candidate")


def send(f, obj):
    data = json.dumps(obj).encode()
    f.write(len(data).to_bytes(4, "big") + data)
    f.flush()


def recv(f):
    head = f.read(4)
    if len(head) < 4:
        return None
    n = int.from_bytes(head, "big")
    if n > MAX_FRAME:
        raise ValueError("reply of %d bytes is over the %d-byte limit" % (n, MAX_FRAME))
    data = f.read(n)
    if len(data) < n:
        return None
    return json.loads(data)


def set_limits(cfg):
    for name, value in (("RLIMIT_CPU", cfg["cpu"]), ("RLIMIT_FSIZE", cfg["fsize"]), ("RLIMIT_CORE", 0),
                        ("RLIMIT_NOFILE", cfg["nofile"]), ("RLIMIT_NPROC", cfg["nproc"])):
        resource.setrlimit(getattr(resource, name), (value, value))
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cfg["mem"], cfg["mem"]))
    except (ValueError, OSError):
        pass  # macOS cannot cap the address space; the CPU and wall-clock limits still stop runaway programs


def drop_root(uid):
    """root inside bubblewrap (no user namespace) → `uid`, for good: all three ids, no groups, no capabilities."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    caps = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith(("CapEff", "CapPrm"))]
    if os.getresuid() != (uid, uid, uid) or any(int(c, 16) for c in caps):
        os._exit(70)  # never run untrusted code with privileges left


def guard(root):
    """unsafe_inprocess only: the PEP 578 audit hook that refuses sockets, processes, ctypes, signals and
    writes outside `root` — a check in the same process as the code it guards, which such code can defeat."""
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    o_write = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    blocked = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
               "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.", "pty.",
               "resource.setrlimit", "resource.prlimit", "sys.remote_exec")
    blocked_imports = {"_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_interpreters"}
    writes = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
              "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
              "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
              "shutil.rmtree": (0,), "shutil.chown": (0,), "sqlite3.connect": (0,)}
    busy = [False]

    def inside(path):
        if isinstance(path, int) or path is None:
            return True
        p = fsdecode(path)
        if p in (":memory:", "", "/dev/null"):
            return True
        p = realpath(p)
        return p == root or p.startswith(root + sep)

    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            if event.startswith(blocked):
                raise PermissionError("sandbox: '%s' is not allowed" % event)
            if event == "import" and args[0] in blocked_imports:
                raise ImportError("sandbox: importing %s is not allowed" % args[0])
            if event == "open":
                path, mode, flags = args
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                          (isinstance(flags, int) and flags & o_write)
                if writing and not inside(path):
                    raise PermissionError("sandbox: writing %s outside the sandbox directory" % (path,))
            elif event in writes:
                for i in writes[event]:
                    if i < len(args) and not inside(args[i]):
                        raise PermissionError("sandbox: %s on %s outside the sandbox directory" % (event, args[i]))
        finally:
            busy[0] = False

    sys.addaudithook(hook)


def run_program(source, nonce):
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__sandbox__", "__builtins__": __builtins__})
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.write("\n" + nonce + "\n")
    sys.stdout.flush()
    os._exit(0)


def run_candidate(source, entry, calls, replies):
    try:
        ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
        exec(compile(source, "candidate.py", "exec"), ns)
        fn = ns[entry]
        if not callable(fn):
            raise TypeError("%s is not a function" % entry)
    except BaseException as e:
        traceback.print_exc()
        sys.stderr.flush()
        send(replies, {"load": "%s: %s" % (type(e).__name__, str(e)[:300])})
        os._exit(1)
    send(replies, {"load": None})
    while True:
        msg = recv(calls)
        if msg is None:
            os._exit(0)
        try:
            value = fn(*decode(msg["args"]), **decode(msg["kwargs"]))
            reply = {"value": encode(value)}
        except BaseException as e:  # noqa: BLE001 — SystemExit included: the judge decides what it means
            reply = {"raised": type(e).__name__, "message": str(e)[:300]}
        for stream in (sys.stdout, sys.stderr):  # what it printed reaches the log before the process is killed
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 — a replaced or closed stream is the candidate's business
                pass
        send(replies, reply)


class CandidateError(Exception):
    """The candidate could not answer (died, sent junk, or its value is not plain data)."""


class CandidateTimeout(BaseException):
    """Out of time for this candidate (a BaseException: a test's ``except Exception`` must not swallow it)."""


def _wait(fd, deadline, write=False):
    import select

    left = deadline - time.monotonic()
    if left <= 0 or not select.select([] if write else [fd], [fd] if write else [], [], left)[int(write)]:
        raise CandidateTimeout()


def read_exact(fd, n, deadline):
    buf = bytearray()
    while len(buf) < n:
        _wait(fd, deadline)
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_until(fd, deadline):
    """One frame from the candidate before `deadline`; None if its pipe closed."""
    head = read_exact(fd, 4, deadline)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    if n > MAX_FRAME:
        raise CandidateError("reply of %d bytes is over the %d-byte limit" % (n, MAX_FRAME))
    data = read_exact(fd, n, deadline)
    return None if data is None else json.loads(data)


def send_until(fd, obj, deadline):
    data = json.dumps(obj).encode()
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        _wait(fd, deadline, write=True)
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            continue
        except BrokenPipeError:
            raise CandidateError("the candidate's process died") from None


def judge_one(code, spec, rfd, wfd, deadline):
    """Run the test against one candidate (its pipes `rfd`/`wfd`) → (status, message)."""
    import builtins

    state = {"loaded": False}

    def call(*args, **kwargs):
        if not state["loaded"]:
            first = recv_until(rfd, deadline)
            if first is None or first.get("load"):
                raise CandidateError("the candidate's code failed to load: %s" % ((first or {}).get("load")
                                                                                 or "its process died"))
            state["loaded"] = True
        send_until(wfd, {"args": encode(list(args)), "kwargs": encode(dict(kwargs))}, deadline)
        reply = recv_until(rfd, deadline)
        if reply is None:
            raise CandidateError("the candidate's process died during the call")
        if "raised" in reply:
            kind = getattr(builtins, str(reply["raised"]), None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                kind = CandidateError
            raise kind("candidate raised %s: %s" % (reply["raised"], reply.get("message")))
        try:
            return decode(reply["value"])
        except (KeyError, TypeError, ValueError) as e:
            raise CandidateError("the candidate's answer is not plain data: %s" % e) from None

    ns = {"__name__": "__judge__", "__builtins__": __builtins__}
    try:
        exec(code[0], ns)
        ns[spec["entry"]] = call  # as in prompt + completion + test: the test's own uses of the name mean the candidate
        exec(code[1], ns)
        ns[spec["check"]](call)
    except CandidateTimeout:
        return "timeout", "out of time"
    except BaseException:  # noqa: BLE001 — an assert, the candidate's error, or the test's own: all "failed"
        return "failed", traceback.format_exc(limit=-3)[-1500:]
    return "passed", ""


def compile_problem(spec):
    """(prompt code, test code) of one problem; the prompt alone may not parse (a stub without a body)."""
    prelude = spec["prelude"]
    for attempt in (prelude, prelude + "    pass\n", ""):  # the prompt defines helpers the test may use
        try:
            prelude_code = compile(attempt, "prompt.py", "exec")
            break
        except SyntaxError:
            continue
    return prelude_code, compile(spec["test"], "test.py", "exec")


def run_judge(batch, fds, verdicts):
    """Judge candidates one after another (``batch["jobs"][i]`` is candidate i's problem; fds: their
    (read, write) pipe pairs), writing one verdict line each."""
    compiled = {}
    for i, spec in enumerate(batch["jobs"]):
        rfd, wfd = fds[2 * i], fds[2 * i + 1]
        os.set_blocking(wfd, False)
        key = (spec["prelude"], spec["test"])
        try:
            if key not in compiled:
                compiled[key] = compile_problem(spec)
            status, message = judge_one(compiled[key], spec, rfd, wfd, time.monotonic() + batch["timeout"])
        except BaseException:  # noqa: BLE001 — a test that does not compile fails its candidates, with the reason
            status, message = "failed", traceback.format_exc(limit=-1)[-1500:]
        os.close(rfd)
        os.close(wfd)  # the candidate reads EOF and exits
        verdicts.write((json.dumps({"i": i, "status": status, "message": message}) + "\n").encode())
        verdicts.flush()
    os._exit(0)


def main():
    cfg = json.loads(sys.argv[1])
    set_limits(cfg)
    if cfg.get("uid") is not None:
        drop_root(cfg["uid"])
    if cfg.get("guard"):
        guard(os.path.realpath(os.getcwd()))
    role = cfg["role"]
    if role == "probe":  # the sandbox is what it should be: not root, the Python installation read-only
        try:
            open(os.path.join(sys.prefix, "tunelab-probe"), "w")
            writable = True
        except OSError:
            writable = False
        sys.stdout.write("%d %s\n" % (os.getuid(), "ok" if os.getuid() != 0 and not writable else "NOT ISOLATED"))
        sys.stdout.flush()
        os._exit(0)
    payload = json.loads(sys.stdin.buffer.read())  # the parent wrote it and closed the pipe
    if role == "program":
        run_program(payload["source"], payload["nonce"])
    if role == "candidate":
        run_candidate(payload["source"], payload["entry"], calls=os.fdopen(cfg["fds"][0], "rb"),
                      replies=os.fdopen(cfg["fds"][1], "wb"))
    else:
        run_judge(payload, cfg["fds"][:-1], os.fdopen(cfg["fds"][-1], "wb"))


if __name__ == "__main__":
    main()

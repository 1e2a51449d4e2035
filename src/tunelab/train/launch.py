"""What `tunelab train CONFIG` runs: a multi-stage pipeline (``stages:``) or one run.

The only place that tells the two apart; `run.run` is the single-stage orchestrator and `pipeline.run_pipeline`
calls it once per stage. `relaunch` is ``--nproc N``: the same command on N ranks through torchrun, with what a
Ctrl-C does there (torchrun's shutdown, then the ranks' own abort, and no rank left running).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

from ..config import RunConfig
from ..objectives import validate_run_config
from .pipeline import run_pipeline
from .run import run


def train(cfg: RunConfig, stop_after: int | None = None, source: str | Path | None = None) -> Path:
    """Run `cfg` (or each of its stages) to completion; returns the run (or pipeline) directory. A `RunConfig`
    built without the registry's schema is validated by it first (every objective's section, with defaults).
    `source`: the config file `cfg` came from (a pipeline's errors name its lines)."""
    cfg = validate_run_config(cfg)
    if cfg.stages:
        return run_pipeline(cfg, source)
    return run(cfg, stop_after)


def relaunch(nproc: int, argv: list[str]) -> int:
    """`tunelab train … --nproc N`: run `python -m tunelab ARGV` on N local ranks through torchrun's own launcher
    (standalone rendezvous). Returns the exit status: 2 when a rank failed with a user error (that rank printed
    it), 130 after a Ctrl-C (rank 0 printed where the ranks stopped; 128 + the signal for another one torchrun
    stops on, SIGTERM or SIGHUP), 1 for any other failure.

    Ctrl-C: the ranks run in sessions of their own (torchrun's choice), so only this process gets it. The first
    goes to torchrun's own handling — SIGINT to every rank (each stops at the end of the same step and saves,
    train/interrupt.py), a wait of ``--shutdown-timeout`` (120 s here rather than torchrun's 30, so that a slow
    CPU step and a sharded save fit; ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` sets another), then SIGKILL; a second
    is sent on to the ranks (their second SIGINT: abort at once), a third kills them (`_ForwardInterrupts`)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    import tempfile

    ours = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ
    timeout = os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")  # the ranks read it for their notice
    # where the first rank to fail with a user error says so (the ranks inherit the environment); its name is
    # unique to this launch, so it also tells this launch's ranks from any other child process
    fd, os.environ["TUNELAB_ERROR_FILE"] = tempfile.mkstemp(prefix="tunelab-error-")
    os.close(fd)
    os.unlink(os.environ["TUNELAB_ERROR_FILE"])
    forward = _ForwardInterrupts(f"TUNELAB_ERROR_FILE={os.environ['TUNELAB_ERROR_FILE']}")
    handled = "SIGTERM,SIGHUP,SIGQUIT" + ("" if forward.installed else ",SIGINT")  # SIGINT: ours, see above
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", f"--shutdown-timeout={timeout}",
                                         f"--signals-to-handle={handled}", "-m", "tunelab", *argv])
    quiet = _ExpectedShutdownLogs()
    try:
        forward.install()
        torchrun(args)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        return 2 if 2 in codes else 130 if 130 in codes else 1
    except SignalException as e:  # torchrun stopped its ranks on a signal; rank 0 said where they stopped
        return 128 + int(e.sigval)
    finally:
        forward.close()  # torchrun's handlers out, ours out, and no rank of this launch left running
        quiet.close()
        if ours:
            os.environ.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
        path = os.environ.pop("TUNELAB_ERROR_FILE")
        if os.path.exists(path):
            os.unlink(path)
    return 0


def launch_ranks(marker: str) -> list[int]:
    """The live child processes of this one whose environment holds `marker` ("NAME=value"): this launch's ranks.
    Read from /proc (Linux); elsewhere none are found and torchrun's own shutdown is all there is."""
    found = []
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc/self/stat").exists() else []:
        try:
            stat = (entry / "stat").read_text()
            state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
            if int(ppid) != os.getpid() or state == "Z":
                continue
            if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
    return found


def signal_ranks(marker: str, sig: int) -> None:
    """Send `sig` to this launch's ranks — to each one's process group, as torchrun does (each leads its own)."""
    for pid in launch_ranks(marker):
        with contextlib.suppress(OSError):
            os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)


class _ForwardInterrupts:
    """SIGINT in the `tunelab train --nproc` process while torchrun runs. The first raises torchrun's own
    `SignalException` (what its handler does: torchrun then sends SIGINT to every rank and waits for them); the
    second is sent on to the ranks while torchrun waits — a rank's second SIGINT aborts it at once, naming the
    newest complete checkpoint; the third SIGKILLs them. `close` restores the handlers torchrun and this class
    replaced and SIGKILLs any rank of this launch still running, however torchrun ended."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self, marker: str):
        from torch.distributed.elastic.multiprocessing.api import SignalException

        self.marker, self.count, self.torchrun_signal = marker, 0, SignalException
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        self.installed = threading.current_thread() is threading.main_thread()  # else: torchrun's handling only

    def install(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self)

    def __call__(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            raise self.torchrun_signal(f"Process {os.getpid()} got signal: SIGINT", sigval=signal.SIGINT)
        signal_ranks(self.marker, signal.SIGINT if self.count == 2 else signal.SIGKILL)

    def close(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C now would only cut the clean-up short
        signal_ranks(self.marker, signal.SIGKILL)
        if self.installed:
            for s, handler in self.previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class _ExpectedShutdownLogs(logging.Filter):
    """Drops torchrun's warnings that it is sending the ranks the Ctrl-C (rank 0 says what happens), while
    `relaunch` runs; its warning that a rank had to be SIGKILLed after the timeout still shows."""

    EXPECTED = {"torch.distributed.elastic.agent.server.api": "Received %s death signal, shutting down workers",
                "torch.distributed.elastic.multiprocessing.api": "Sending process %s closing signal %s"}

    def __init__(self):
        super().__init__()
        for name in self.EXPECTED:
            logging.getLogger(name).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.EXPECTED.get(record.name) != record.msg

    def close(self) -> None:
        for name in self.EXPECTED:
            logging.getLogger(name).removeFilter(self)

"""Ctrl-C during training: stop at the end of the current step, keep a checkpoint there, say how to go on.

    interrupted at step 17/40: kept checkpoint runs/x/checkpoints/step-000017; run the same command again to resume

The first SIGINT only sets a flag (`StopRequest.requested`): the optimizer step in progress finishes — a step cut
in half would leave gradients accumulated and the weights, optimizer and scheduler out of step with each other —
then the loop saves a checkpoint at that step (the same atomic, verified format as `train.save_every`'s, whether or
not periodic saving is on) and raises `TrainingInterrupted` with the line above; the CLI prints it and exits with
status 130 (128 + SIGINT, the shell's convention), no traceback. A save that cannot be done safely (weights with
NaN, a full disk: `checkpoint.save_checkpoint` refuses and removes its partial folder) is not retried: the line
names the newest checkpoint that is kept instead. Re-running the same command resumes from that checkpoint
(`rundir` + `loop.fit`: a run folder with a checkpoint is resumed unless ``resume: false``).

A second SIGINT (the step is slow, or the user does not want to wait) aborts at once: `TrainingInterrupted` is
raised from the handler itself — inside a checkpoint save too, whose ``except BaseException`` removes the partial
folder — with a line naming the newest complete checkpoint, which is what the next run resumes from.

The handler is installed by the loop in the main thread (Python delivers signals there; `signal.signal` refuses
other threads), and the previous handler is restored when the loop ends.

Under torchrun a terminal's Ctrl-C does not reach the ranks (torchrun starts each in a session of its own): it
reaches the torchrun agent, which sends SIGINT to every rank, waits up to its ``--shutdown-timeout`` (30 s by
default; `tunelab train --nproc` asks for 120 s, `launch.relaunch`), then SIGKILLs them. The ranks' signals land at
different moments, and a checkpoint is a collective save, so at the end of every step the ranks agree
(`StopRequest.agreed`: the largest of their flags, one all-reduce of one integer): all of them stop after the same
step, save the sharded checkpoint there together and exit 130; only rank 0 prints the notice and the line. A
second Ctrl-C on `tunelab train --nproc` is sent on to the ranks as their second SIGINT (abort at once; a rank
whose peer aborted while it waited in a collective exits 130 quietly, `stopping`), a third kills them. A plain
``torchrun`` stops the ranks the same way but prints its own warnings and SignalException traceback (exit 1), and
on a second Ctrl-C it SIGTERMs the ranks (no line; the newest complete checkpoint is what a re-run resumes from).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Callable

from .checkpoint import complete_checkpoints

_stopping: list[StopRequest] = []  # this process's StopRequest once a stop was requested (see `stopping`)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C; `str(e)` is the one line that says where and what was kept."""


def kept_line(ckpt_dir: Path) -> str:
    """What a re-run resumes from: the newest complete checkpoint, or nothing."""
    kept = complete_checkpoints(ckpt_dir)
    if not kept:
        return "no checkpoint was kept; running the same command again starts from step 0"
    return f"kept checkpoint {kept[-1]}; run the same command again to resume"


def stopping() -> StopRequest | None:
    """The StopRequest of this process if a stop was requested (a Ctrl-C came, or the ranks agreed on one): under
    torchrun a rank whose collective fails then failed because a peer aborted or was killed — part of the stop."""
    return _stopping[-1] if _stopping else None


def _notice(torchrun: bool) -> bytes:
    if not torchrun:
        return (b"\nCtrl-C: stopping at the end of this step and saving a checkpoint there "
                b"(Ctrl-C again to abort now)\n")
    limit = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")  # set by `tunelab train --nproc`, or by the user
    within = f"{limit} s" if limit else "30 s by default"
    return (f"\nCtrl-C: every rank stops at the end of this step and saves a checkpoint there (torchrun kills the "
            f"ranks if that takes over its --shutdown-timeout, {within}; Ctrl-C again to abort now)\n").encode()


class StopRequest:
    """Context manager: while inside, the first Ctrl-C sets `requested`, a second raises `TrainingInterrupted`.
    `announce`: print the notice (rank 0 only under torchrun); `torchrun`: the notice names torchrun's limit."""

    def __init__(self, ckpt_dir: Path, total: int, step: int = 0, enabled: bool = True,
                 announce: bool = True, torchrun: bool = False):
        self.ckpt_dir, self.total = ckpt_dir, total
        self.step = step  # the last completed step (the loop keeps it current, for the abort line)
        self.requested = False
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.announce, self.torchrun = announce, torchrun
        self._previous = None

    def abort_line(self) -> str:
        return f"aborted after step {self.step}/{self.total}: {kept_line(self.ckpt_dir)}"

    def _request(self) -> None:
        self.requested = True
        if self not in _stopping:
            _stopping.append(self)

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise TrainingInterrupted(self.abort_line())
        self._request()
        if self.announce:  # os.write: the handler may run while the console is in the middle of printing a line
            os.write(2, _notice(self.torchrun))

    def agreed(self, max_over_ranks: Callable[[int], int] | None = None) -> bool:
        """Stop now? At a step's end. Under torchrun `max_over_ranks` (`Engine.max_int`, a collective: every rank
        calls it at the same step) makes it "did any rank's Ctrl-C come", so every rank answers the same."""
        requested = bool(max_over_ranks(int(self.requested))) if max_over_ranks is not None else self.requested
        if requested and not self.requested:  # a peer's signal came first: this rank is stopping too
            self._request()
        return requested

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)

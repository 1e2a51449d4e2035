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

The handler is installed by the single-process loop only, in the main thread (Python delivers signals there;
`signal.signal` refuses other threads), and the previous handler is restored when the loop ends. Under torchrun
every rank gets its own SIGINT at its own moment, and a checkpoint is a collective save: the loop leaves the
default behaviour (KeyboardInterrupt where it lands) there.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from .checkpoint import complete_checkpoints


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C; `str(e)` is the one line that says where and what was kept."""


def kept_line(ckpt_dir: Path) -> str:
    """What a re-run resumes from: the newest complete checkpoint, or nothing."""
    kept = complete_checkpoints(ckpt_dir)
    if not kept:
        return "no checkpoint was kept; running the same command again starts from step 0"
    return f"kept checkpoint {kept[-1]}; run the same command again to resume"


class StopRequest:
    """Context manager: while inside, the first Ctrl-C sets `requested`, a second raises `TrainingInterrupted`."""

    def __init__(self, ckpt_dir: Path, total: int, step: int = 0, enabled: bool = True):
        self.ckpt_dir, self.total = ckpt_dir, total
        self.step = step  # the last completed step (the loop keeps it current, for the abort line)
        self.requested = False
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise TrainingInterrupted(f"aborted after step {self.step}/{self.total}: {kept_line(self.ckpt_dir)}")
        self.requested = True
        # os.write: the handler may run while the console is in the middle of printing a line
        os.write(2, b"\nCtrl-C: stopping at the end of this step and saving a checkpoint there "
                    b"(Ctrl-C again to abort now)\n")

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)

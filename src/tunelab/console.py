"""The one rich console every layer prints to (stderr, so stdout stays clean for `--json` output), and `phase`:
how a step that takes a while (an evaluation, sample generation, a rollout, reference log-probs, an export, the
default model's one-time conversion) says what it is doing and how far along it is.

    with phase("generating 4 samples before training"):
        ...                      # inner loops report their batches: `progress(total=…)` once, `advance()` per batch

On a terminal a phase is a live row (spinner, bar, done/total, elapsed) — a row of the training bar when one is
showing, so a rollout inside a step is visible under it — and a ``✓ what (12 s)`` line when it took a second or
more. Without a terminal (``> log``, nohup, SLURM) it is plain lines: ``what …`` at the start, ``what: 3/8``
at most every `PLAIN_EVERY` seconds, ``what: done in 12 s`` at the end; during training (where the step lines
already say how it goes) a phase is silent unless it runs longer than `PLAIN_EVERY` seconds. The innermost open
phase receives the batches that `sampling.sample` and `objectives.scoring.score_batches` report, so no caller
passes a handle down.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 run``, ``2 runs``, ``0 runs``: a count with its noun in the right number (`many`: an irregular plural)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"

PLAIN_EVERY = 10.0  # seconds between two progress lines of one phase without a terminal
_training: list[Progress | None] = []  # the displays of running trainings (their phases: no ✓ line unless long)
_open: list["Phase"] = []  # the open phases, innermost last
_live: list[Progress | None] = []  # where phases show: the training bar's rows; None: training without a terminal
_fields: dict[int, dict] = {}  # id(display) -> the extra fields its columns read (empty for a phase's row)


class Phase:
    """One announced phase: `total` grows as inner loops report their batches; `advance()` counts them done."""

    def __init__(self, what: str, total: int | None):
        self.what, self.total, self.done = what, total, 0
        self.t0 = self.last_line = time.perf_counter()
        self.row = None  # (progress, task id) on a terminal
        self.quiet = False  # without a terminal during training: lines only once it has run PLAIN_EVERY seconds

    def expect(self, n: int) -> None:
        """`n` more units of work (batches) in this phase."""
        self.total = (self.total or 0) + n
        self._show()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._show()

    def _show(self) -> None:
        if self.row is not None:
            progress, task = self.row
            progress.update(task, completed=self.done, total=self.total)
        elif time.perf_counter() - self.last_line >= PLAIN_EVERY:
            self.last_line = time.perf_counter()
            console.print(f"{self.what}: {self.done}/{self.total or '?'} ({self.last_line - self.t0:.0f} s)",
                          highlight=False, soft_wrap=True)


def progress(total: int) -> None:
    """An inner loop announces `total` batches to the innermost open phase (nothing outside a phase)."""
    if _open:
        _open[-1].expect(total)


def advance(n: int = 1) -> None:
    """An inner loop finished `n` batches of the innermost open phase (nothing outside a phase)."""
    if _open:
        _open[-1].advance(n)


@contextmanager
def live(progress_display: Progress | None, fields: dict | None = None):
    """While this is open, phases show as rows of `progress_display` (the training bar) instead of their own;
    None: training is showing plain step lines (no terminal), so phases stay quiet unless they run long.
    `fields`: what the display's columns read from a task besides its description (a phase row gets these)."""
    _live.append(progress_display)
    _training.append(progress_display)
    _fields[id(progress_display)] = fields or {}
    try:
        yield progress_display
    finally:
        _live.remove(progress_display)
        _training.remove(progress_display)
        _fields.pop(id(progress_display), None)


@contextmanager
def phase(what: str, total: int | None = None, delay: float = 0.0):
    """Announce `what` for the duration of the block; yields the `Phase` (``advance()`` it, or let the inner
    loops do so). See the module docstring for what a terminal and a log file show. `delay`: without a terminal,
    say nothing unless the block is still running after this many seconds (a command whose first checks may fail
    at once: its error stays the only line)."""
    ph = Phase(what, total)
    own = timer = None
    if console.is_terminal and not (_live and _live[-1] is None):
        if not _live:  # no display showing: this phase brings its own (transient: the ✓ line stays)
            own = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=console, transient=True)
            own.start()
            _live.append(own)
        display = _live[-1]
        ph.row = (display, display.add_task(what, total=total, **_fields.get(id(display), {})))
    elif _live:  # plain step lines are showing: quiet unless it runs long
        ph.quiet = True
    elif delay > 0:
        ph.quiet = True  # until the timer says it

        def announce():
            ph.quiet = False
            console.print(f"{what} …", highlight=False, soft_wrap=True)
        timer = threading.Timer(delay, announce)
        timer.daemon = True
        timer.start()
    else:
        console.print(f"{what} …", highlight=False, soft_wrap=True)
    _open.append(ph)
    finished = False
    try:
        yield ph
        finished = True
    finally:
        _open.remove(ph)
        if timer is not None:
            timer.cancel()
        seconds = time.perf_counter() - ph.t0
        if ph.row is not None:
            ph.row[0].remove_task(ph.row[1])
        if own is not None:
            _live.remove(own)
            own.stop()
        if not finished:  # an error: its own line says what happened
            pass
        elif ph.row is None and (not ph.quiet or seconds >= PLAIN_EVERY):
            console.print(f"{what}: done in {seconds:.1f} s", highlight=False, soft_wrap=True)
        elif ph.row is not None and seconds >= (PLAIN_EVERY if ph.row[0] in _training else 1.0):
            console.print(f"[green]✓[/] {what} ({seconds:.0f} s)", highlight=False)

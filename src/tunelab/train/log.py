"""Training logs: the progress display (`TrainDisplay`: a rich bar on a terminal, one plain line per logged step
in a log file), `metrics.jsonl`, optional trackers.

`metrics.jsonl` holds one JSON object per line: training rows (`step`, `loss`, `lr`, `tokens_per_s`, …) and
evaluation rows (`step`, `eval_loss`, …). On resume the file is truncated to the checkpoint's step so the
curve has no duplicated or orphaned rows; a row torn by a kill mid-write is dropped there (`jsonl.read_rows`).
Rows are written unbuffered, and a failed write is cut back so no half row stays. TensorBoard, W&B and MLflow
are used only when listed in `train.trackers`; a tracker that is not installed or fails to start is one line
before training starts (`check_trackers` runs before the model is even loaded), and `close()` finishes them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..console import console, live, phase  # noqa: F401  (phase: re-exported for the orchestrator)
from ..errors import TunelabError
from ..jsonl import read_rows
from .guards import disk_full, is_disk_full


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None, trackers=(), run_dir: Path | None = None,
                 redo_eval: bool = False):
        self.path = path
        if resume_step is not None and path.exists():
            # a torn last row (the run was killed mid-write) is dropped: its step is repeated after the checkpoint;
            # `redo_eval`: the checkpoint is the last step's, whose final evaluation (written after it) runs again
            keep = [r for r in read_rows(path, strict=True) if r.get("step", 0) < resume_step or
                    r.get("step", 0) == resume_step and not (redo_eval and "loss" not in r)]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        self.trackers = [_start_tracker(name, run_dir or path.parent) for name in trackers]

    def write(self, row: dict) -> None:
        if "round" in row:  # online RL: the source counts rounds of rollouts; one round is not "epoch 1.0"
            row = {k: v for k, v in row.items() if k != "epoch"}
        if "loss" not in row:  # an evaluation row: a measure with nothing held out is NaN, i.e. not measured
            row = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            if set(row) <= {"step"}:
                return
        data = (json.dumps(row) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # unbuffered: errors surface here
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as e:
                os.ftruncate(fd, end)  # no half-written row left behind
                if is_disk_full(e):
                    raise disk_full(f"a row of {self.path.name}", self.path.parent, len(data)) from None
                raise
        finally:
            os.close(fd)
        for log, _ in self.trackers:
            log(row)

    def close(self) -> None:
        """Flush and finish every tracker (TensorBoard files closed, the W&B / MLflow run marked finished)."""
        for _, finish in self.trackers:
            finish()
        self.trackers = []


# tracker name -> (module to import, pip package) — checked before a run loads anything (`check_trackers`)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}


def check_trackers(names) -> None:
    """One line for a tracker that is unknown or not installed, before the run starts."""
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            raise TunelabError(f"train.trackers: unknown tracker '{name}' (choose from {', '.join(TRACKERS)})")
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise TunelabError(f"train.trackers: '{name}' is not installed (pip install {package}, or "
                               "pip install 'tunelab[trackers]')")


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _start_tracker(name: str, run_dir: Path):
    """(log(row), finish()) of a started tracker; a failure to start is one line naming the tracker."""
    check_trackers([name])
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            w = SummaryWriter(str(run_dir / "tensorboard"))

            def log(r, w=w):
                for k, v in _numbers(r).items():
                    w.add_scalar(k, v, r["step"])
                w.flush()
            return log, w.close
        if name == "wandb":  # offline with WANDB_MODE=offline; the run's files go under RUN_DIR/wandb
            import wandb

            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunelab"), dir=str(run_dir),
                             name=run_dir.name, reinit="finish_previous")
            return (lambda r: run.log(_numbers(r), step=r["step"])), run.finish
        import mlflow  # MLFLOW_TRACKING_URI selects the server; default: a local store in RUN_DIR/mlruns

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow ≥ 3.7 wants an opt-in for the file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)  # set every time: an earlier run in this process set its own
        if mlflow.active_run() is not None:  # left open by an earlier run of this process that failed mid-way
            mlflow.end_run(status="FAILED")
        run_id = mlflow.start_run(run_name=run_dir.name).info.run_id
        return (lambda r: mlflow.log_metrics(_numbers(r), step=r["step"], run_id=run_id)), mlflow.end_run
    except Exception as e:  # noqa: BLE001 — any library's start-up failure becomes the user's one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TunelabError(f"train.trackers: {name} failed to start: {first}") from None


BAR_METRICS = ("reward", "kl", "pref_accuracy")  # shown on the progress line when an objective reports them
ETA_WINDOW = 10  # the ETA is the mean time of the last this-many steps × the steps left


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def step_extra(metrics: dict) -> str:
    """The objective's own numbers for the progress line: reward, KL, … and, for online RL, the share of prompt
    groups whose completions all scored the same (``zero_signal_groups``: their advantages, loss and gradient
    are 0) and the share of completions cut off by ``rl.max_new_tokens`` (``truncated``)."""
    parts = [f"{k} {metrics[k]:.3f}" for k in BAR_METRICS if k in metrics]
    if "zero_signal_groups" in metrics:
        parts.append(f"zero-signal {metrics['zero_signal_groups']:.0%}")
    if "truncated" in metrics:
        parts.append(f"truncated {metrics['truncated']:.0%}")
    if "round" in metrics:  # online RL: a round of rollouts, not an epoch over a dataset
        parts.append(f"round {int(metrics['round']) + 1}")
    return "  ".join(parts)


class TrainDisplay:
    """How training shows its steps. On a terminal: a rich bar (loss, lr, tok/s, the objective's numbers, elapsed,
    ETA) under which `console.phase` rows (a rollout, an evaluation) appear. Without one (``> log 2>&1``, nohup,
    SLURM): one plain line per logged step (every ``train.log_every`` steps and the last), e.g.

        step 3/40  loss 0.4121  lr 1.00e-04  812 tok/s  reward 0.250  zero-signal 50%  elapsed 0:00:31  eta 0:06:40

    and when only stdout is redirected (``tunelab train … > log``) the bar stays on the terminal and the plain
    lines go to stdout. The ETA is the mean duration of the last `ETA_WINDOW` steps × the steps left, so it works
    however long a step takes (rich's own estimate forgets samples older than 30 s: a slower step never got one).
    """

    def __init__(self, total: int, start: int = 0, log_every: int = 1, out=None):
        self.total, self.start, self.log_every = total, start, log_every
        self.times: list[float] = []
        self.t0 = time.perf_counter()
        self.terminal = console.is_terminal
        # where plain lines go: the console when it is not a terminal, else stdout when that is redirected
        self.plain = out if out is not None else (console if not self.terminal
                                                   else None if sys.stdout.isatty() else Console(file=sys.stdout))
        self.bar: Progress | None = None
        self._live = None

    def __enter__(self) -> "TrainDisplay":
        if not self.terminal:
            self._live = live(None)  # phases inside a step stay quiet: the step lines say how it goes
            self._live.__enter__()
        else:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                TextColumn("{task.fields[eta]}"), console=console)
            self.bar.add_task("train", total=self.total, completed=self.start, stats="loss -  lr -  - tok/s",
                              eta="ETA -:--:--")
            self.bar.start()
            self._live = live(self.bar, {"stats": "", "eta": ""})
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.__exit__(*exc)
        if self.bar is not None:
            self.bar.stop()

    def eta(self, step: int) -> float | None:
        if not self.times:
            return None
        recent = self.times[-ETA_WINDOW:]
        return sum(recent) / len(recent) * (self.total - step)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, seconds: float, metrics: dict) -> None:
        """Step `step` (1-based) is done: it took `seconds`; `metrics` are the objective's and the source's."""
        self.times.append(seconds)
        extra, eta = step_extra(metrics), _clock(self.eta(step))
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s" + (f"  {extra}" if extra else "")
        if self.bar is not None:
            self.bar.update(self.bar.task_ids[0], completed=step, stats=stats, eta=f"ETA {eta}")
        if self.plain is not None and (step % self.log_every == 0 or step == self.total):
            line = f"step {step}/{self.total}  {stats}  elapsed {_clock(time.perf_counter() - self.t0)}  eta {eta}"
            self.plain.print(line, highlight=False, soft_wrap=True)

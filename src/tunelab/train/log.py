"""Training logs: a rich progress bar (loss, lr, tokens/s, ETA), `metrics.jsonl`, optional trackers.

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
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..console import console
from ..errors import TunelabError
from ..jsonl import read_rows
from .guards import disk_full, is_disk_full


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None, trackers=(), run_dir: Path | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            # a torn last row (the run was killed mid-write) is dropped: its step is repeated after the checkpoint
            keep = [r for r in read_rows(path, strict=True) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        self.trackers = [_start_tracker(name, run_dir or path.parent) for name in trackers]

    def write(self, row: dict) -> None:
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


def progress_bar(total: int, start: int = 0) -> Progress:
    p = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                 TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                 TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[extra]}"), TimeElapsedColumn(),
                 TextColumn("ETA"),
                 TimeRemainingColumn(), console=console, transient=False, disable=not sys.stderr.isatty() and False)
    p.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-", extra="")
    return p

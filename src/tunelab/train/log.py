"""Training logs: a rich progress bar (loss, lr, tokens/s, ETA), `metrics.jsonl`, optional trackers.

`metrics.jsonl` holds one JSON object per line: training rows (`step`, `loss`, `lr`, `tokens_per_s`, …) and
evaluation rows (`step`, `eval_loss`, …). On resume the file is truncated to the checkpoint's step so the
curve has no duplicated or orphaned rows; a row torn by a kill mid-write is dropped there (`jsonl.read_rows`).
Rows are written unbuffered, and a failed write is cut back so no half row stays. TensorBoard, W&B and MLflow are
used only when listed in `train.trackers` and installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..console import console
from ..jsonl import read_rows
from .guards import disk_full, is_disk_full


TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None, trackers=(), run_dir: Path | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            # a torn last row (the run was killed mid-write) is dropped: its step is repeated after the checkpoint
            keep = [r for r in read_rows(path, strict=True) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        self.trackers = _open_trackers(trackers, run_dir or path.parent)

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
        for t in self.trackers:
            t(row)


def check_trackers(names) -> list[str]:
    """The listed trackers that are installed; a warning for each that is not (before the run writes anything)."""
    found = [n for n in names if importlib.util.find_spec(TRACKER_MODULES[n]) is not None]
    for name in names:
        if name not in found:
            console.print(f"[yellow]tracker '{name}' is not installed; skipping it[/]")
    return found


def _open_trackers(names, run_dir: Path):
    out = []
    for name in names:
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            continue  # warned about by check_trackers
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                w = SummaryWriter(str(run_dir / "tensorboard"))
                out.append(lambda r, w=w: [w.add_scalar(k, v, r["step"]) for k, v in r.items()
                                           if k != "step" and isinstance(v, (int, float))] and w.flush())
            elif name == "wandb":
                import wandb

                wandb.init(project="tunelab", dir=str(run_dir), name=run_dir.name)
                out.append(lambda r: wandb.log(r, step=r["step"]))
            elif name == "mlflow":
                import mlflow

                mlflow.start_run(run_name=run_dir.name)
                out.append(lambda r: mlflow.log_metrics({k: v for k, v in r.items() if k != "step"}, step=r["step"]))
        except ImportError:
            console.print(f"[yellow]tracker '{name}' is not installed; skipping it[/]")
        except Exception as e:  # not logged in, no server, a broken install: the training itself still runs
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            console.print(f"[yellow]tracker '{name}' could not start ({type(e).__name__}: {first}); skipping it[/]")
    return out


def progress_bar(total: int, start: int = 0) -> Progress:
    p = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                 TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                 TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[extra]}"), TimeElapsedColumn(),
                 TextColumn("ETA"),
                 TimeRemainingColumn(), console=console, transient=False, disable=not sys.stderr.isatty() and False)
    p.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-", extra="")
    return p

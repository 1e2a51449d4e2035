"""Training logs: a rich progress bar (loss, lr, tokens/s, ETA), `metrics.jsonl`, optional trackers.

`metrics.jsonl` holds one JSON object per line: training rows (`step`, `loss`, `lr`, `tokens_per_s`, …) and
evaluation rows (`step`, `eval_loss`, …). On resume the file is truncated to the checkpoint's step so the
curve has no duplicated or orphaned rows. TensorBoard, W&B and MLflow are used only when listed in
`train.trackers` and installed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..console import console
from .guards import disk_full, is_disk_full



class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None, trackers=(), run_dir: Path | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        self.trackers = _open_trackers(trackers, run_dir or path.parent)

    def write(self, row: dict) -> None:
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


def _open_trackers(names, run_dir: Path):
    out = []
    for name in names:
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
    return out


def progress_bar(total: int, start: int = 0) -> Progress:
    p = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                 TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                 TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[extra]}"), TimeElapsedColumn(),
                 TextColumn("ETA"),
                 TimeRemainingColumn(), console=console, transient=False, disable=not sys.stderr.isatty() and False)
    p.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-", extra="")
    return p

"""What `tunelab train CONFIG` runs: a multi-stage pipeline (``stages:``) or one run.

The only place that tells the two apart; `run.run` is the single-stage orchestrator and `pipeline.run_pipeline`
calls it once per stage.
"""

from __future__ import annotations

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
    it), 1 for any other failure."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    import os
    import tempfile

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "tunelab", *argv])
    # where the first rank to fail with a user error says so (the ranks inherit the environment)
    fd, os.environ["TUNELAB_ERROR_FILE"] = tempfile.mkstemp(prefix="tunelab-error-")
    os.close(fd)
    os.unlink(os.environ["TUNELAB_ERROR_FILE"])
    try:
        torchrun(args)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        return 2 if 2 in codes else 1
    finally:
        path = os.environ.pop("TUNELAB_ERROR_FILE")
        if os.path.exists(path):
            os.unlink(path)
    return 0

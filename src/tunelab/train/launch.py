"""What `tunelab train CONFIG` runs: a multi-stage pipeline (``stages:``) or one run.

The only place that tells the two apart; `run.run` is the single-stage orchestrator and `pipeline.run_pipeline`
calls it once per stage.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from .pipeline import run_pipeline
from .run import run


def train(cfg: RunConfig, stop_after: int | None = None) -> Path:
    """Run `cfg` (or each of its stages) to completion; returns the run (or pipeline) directory."""
    if cfg.stages:
        return run_pipeline(cfg)
    return run(cfg, stop_after)

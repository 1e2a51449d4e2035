"""`tunelab compare SWEEP.yaml`: train every variant of a sweep, then write one report comparing them.

    tunelab compare examples/studies/lora_vs_full.yaml            # train what is missing, then report
    tunelab compare examples/studies/lora_vs_full.yaml --dry-run  # list variants and their state, train nothing

The sweep folder (``output_dir`` of the sweep file, see `tunelab.lab.sweep`)::

    configs/<variant>.yaml   each variant's full run config (`tunelab train` runs it by hand)
    runs/<variant>/          each variant's ordinary run directory (metrics.jsonl, results.json, …)
    sweep.json               the variants, their overrides and status (done / failed + the error)
    report/                  index.html (single file), results.md, results.csv, *.png

**Resumable by construction.** A variant whose run directory holds ``results.json`` is finished and skipped; a
variant killed mid-training resumes from its latest checkpoint, because `train` resumes any run directory
that has checkpoints. So a killed sweep is continued by running the same command again. A run directory
trained with a *different* config (the sweep file was edited) is never silently reused: that variant fails
with the differing keys named, and you delete the folder (or change `output_dir`) to retrain it.

**Failures stay local.** A variant that raises `TunelabError` (a target pattern matching no module, a task
file missing, …) or runs out of accelerator memory is recorded in ``sweep.json`` and the report, and the sweep
goes on. Every variant's config is validated before anything trains, so a typo in the sweep file stops it at
once instead of after hours. Other exceptions are bugs and propagate with their traceback (the sweep can then
be resumed).

**Under torchrun** (``torchrun --nproc-per-node N -m tunelab compare SWEEP.yaml``) every rank walks the same
variants in the same order, each variant trains data-parallel on all ranks, and only rank 0 writes
``sweep.json`` and the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import TunelabError
from ..userfiles import read_text
from ..yamlfile import load_yaml
from .results import STATE_FILE, flatten
from .sweep import Sweep, resolve

_IGNORED_KEYS = {"overwrite", "resume"}  # how a run is (re)started, not what it computes


@dataclass
class Outcome:
    """What happened to one variant in this invocation of the sweep."""

    name: str
    run_dir: str
    overrides: dict
    status: str  # planned | done (trained now) | skipped (finished before) | failed
    error: str | None = None
    seconds: float | None = None


def run_status(run_dir: Path) -> str:
    """``done`` (results.json), ``partial`` (started: checkpoints or metrics exist) or ``new``."""
    if (run_dir / "results.json").exists():
        return "done"
    ckpt = run_dir / "checkpoints"
    if (ckpt.is_dir() and any(ckpt.iterdir())) or (run_dir / "metrics.jsonl").exists():
        return "partial"
    return "new"


def config_drift(run_dir: Path, cfg) -> list[str]:
    """Keys whose value in the run directory's saved ``config.yaml`` differs from `cfg` (empty: same run)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():  # a pipeline variant saves its whole config as pipeline.yaml
        saved_path = run_dir / "pipeline.yaml"
    if not saved_path.exists():
        return []
    saved = flatten(load_yaml(read_text(saved_path), str(saved_path)) or {})
    now = flatten(json.loads(json.dumps(cfg.model_dump(mode="json"))))  # tuples → lists, as in the saved YAML
    keys = sorted(k for k in set(saved) | set(now) if k.split(".")[0] not in _IGNORED_KEYS)
    return [f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _default_runner(cfg) -> Path:
    from ..train.launch import train

    return train(cfg)


def _recoverable() -> tuple[type[BaseException], ...]:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return (TunelabError, oom)


def run_sweep(sweep: Sweep, *, dry_run: bool = False, runner: Callable | None = None,
              report: bool = True) -> list[Outcome]:
    """Train the sweep's unfinished variants one after another, then build its report.

    `runner(cfg) -> run_dir` trains one variant (default: `tunelab.train.launch.train`); tests pass their own.
    Returns one `Outcome` per variant, in sweep order; ``sweep.json`` is rewritten after every variant so a
    killed sweep leaves an accurate record.
    """
    from ..console import console
    from ..train.distributed import barrier, is_main
    from ..train.task_eval import check_tasks

    runner = runner or _default_runner
    configs = []
    for v in sweep.variants:  # validate everything first: a typo must not surface after hours of training
        try:
            cfg = resolve(sweep, v)
            check_tasks(cfg)  # every eval task file exists and parses
            configs.append(cfg)
        except TunelabError as e:
            raise TunelabError(f"variant '{v.name}': {e}") from None
    outcomes = [Outcome(v.name, str(v.run_dir), v.overrides, "planned") for v in sweep.variants]
    main = is_main()
    if dry_run:
        print_plan(sweep, configs)
        if main:
            _save_state(sweep, outcomes)
        return outcomes
    for i, (v, cfg, out) in enumerate(zip(sweep.variants, configs, outcomes), 1):
        state = run_status(v.run_dir)
        drift = config_drift(v.run_dir, cfg)
        if drift:
            more = " …" if len(drift) > 3 else ""
            out.status = "failed"
            out.error = (f"{v.run_dir} holds a run with a different config ({'; '.join(drift[:3])}{more}); "
                         "delete it to retrain")
            console.print(f"[red]✗ {v.name}: {out.error}[/]")
        elif state == "done":
            out.status = "skipped"
            console.print(f"[dim]✓ [{i}/{len(configs)}] {v.name}: finished earlier, skipped[/]")
        else:
            console.rule(f"[bold][{i}/{len(configs)}] {v.name}" + (" (resuming)" if state == "partial" else ""))
            t0 = time.perf_counter()
            try:
                runner(cfg)
                out.status = "done"
            except _recoverable() as e:
                out.status = "failed"
                out.error = str(e) if isinstance(e, TunelabError) else f"{type(e).__name__}: {e}"
                console.print(f"[red]✗ {v.name} failed: {out.error}[/] — going on with the next variant")
            out.seconds = time.perf_counter() - t0
        if main:
            _save_state(sweep, outcomes)
        barrier()  # rank 0 has written the variant's results before any rank looks at the next one
    if report and main:
        write_sweep_report(sweep)
    return outcomes


def write_sweep_report(sweep: Sweep) -> Path:
    """(Re)build ``<sweep>/report/`` from the sweep folder; returns the path of index.html."""
    from .report import build_report
    from .results import collect

    # the report folder is the sweep folder's own (tunelab made both): its report files are replaced, as a
    # run's own files are in its run folder, also when an older tunelab wrote them (no ledger entry)
    return build_report(collect([sweep.output_dir]), sweep.report_dir, title=sweep.name,
                        description=sweep.description, overwrite=True)


def print_plan(sweep: Sweep, configs: list) -> None:
    """The dry run: each variant, its state on disk and an upper bound of its training tokens."""
    from rich.table import Table

    from ..console import console

    table = Table(title=f"sweep {sweep.name}: {len(configs)} variants → {sweep.output_dir}")
    for col in ("#", "variant", "method", "state", "steps", "≤ train tokens"):
        table.add_column(col, justify="right" if col in ("#", "steps", "≤ train tokens") else "left",
                         overflow="fold")  # a variant's name is its folder name: show all of it
    total = 0
    for i, (v, cfg) in enumerate(zip(sweep.variants, configs), 1):
        steps = cfg.train.max_steps
        # Packed rows are full, so steps × rows × max_length bounds the tokens (and time) of a run.
        tokens = steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.max_length if steps else None
        total += tokens or 0
        state = run_status(v.run_dir)
        if config_drift(v.run_dir, cfg):
            state = "config changed!"
        table.add_row(str(i), v.name, cfg.method, state, str(steps or f"{cfg.train.epochs:g} ep"),
                      f"{tokens:,}" if tokens else "—")
    console.print(table)
    console.print(f"at most {total:,} training tokens in all (variants with max_steps); configs written to "
                  f"{sweep.output_dir / 'configs'}")


def _save_state(sweep: Sweep, outcomes: list[Outcome]) -> None:
    """``sweep.json``: merged with the previous record, so a dry run never erases an earlier error."""
    path = sweep.output_dir / STATE_FILE
    old = {}
    if path.exists():
        try:
            old = {o["name"]: o for o in json.loads(path.read_text()).get("variants", [])}
        except (ValueError, AttributeError):
            old = {}
    rows = []
    for o in outcomes:
        row = asdict(o)
        if o.status == "planned" and o.name in old:
            row = {**old[o.name], "overrides": o.overrides, "run_dir": o.run_dir}
        rows.append(row)
    state = {"name": sweep.name, "description": sweep.description,
             "sweep_file": str(sweep.path) if sweep.path else None, "variants": rows}
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(path)  # atomic: a kill never leaves half a file



def compare_main(sweep_file: str, overrides: list[str] = (), dry_run: bool = False, scale: bool = False) -> int:
    """`tunelab compare`: 0 when every variant finished, 1 when some failed (the report is written anyway)."""
    from .sweep import load_sweep

    sweep = load_sweep(sweep_file, overrides, scale=scale)
    outcomes = run_sweep(sweep, dry_run=dry_run)
    if dry_run:
        return 0
    failed = [o for o in outcomes if o.status == "failed"]
    from ..train.distributed import is_main

    if not is_main():  # under torchrun every rank has the same outcomes; rank 0 reports them
        return 1 if failed else 0
    for o in failed:
        print(f"failed: {o.name}: {o.error}")
    print(f"{len(outcomes) - len(failed)}/{len(outcomes)} variants finished; report: {sweep.report_dir / 'index.html'}")
    return 1 if failed else 0

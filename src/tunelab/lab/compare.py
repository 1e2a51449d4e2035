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

**Seeds, budgets, claims.** With ``seeds:`` every variant runs once per seed (``runs/<variant>/seed-<k>``). With
``match: [...]`` the variants' *configured* budgets (`train.accounting.configured`, computed from the resolved
configs) must agree within 5 % on each listed quantity, or compare refuses before anything trains (``flops``: the
parameter counts come from each model's config.json, nothing is loaded). After the runs, the report computes
every ``claims:`` entry (`lab.claims`, `lab.stats`) and compare prints the verdicts; runs that came from
different tunelab versions or machines get a one-line warning. ``sweep.json`` records the study's own wall time,
summed over every `tunelab compare` invocation of it (``wall_seconds``, ``invocations``), which the report shows
beside the runs' summed seconds.

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

from pydantic import ValidationError

from ..console import plural
from ..errors import TunelabError
from ..userfiles import read_text
from ..yamlfile import load_yaml
from .claims import match_problem
from .results import STATE_FILE, flatten
from .sweep import Sweep, config_path, resolve

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
    variant: str | None = None  # the variant's name (`name` is variant/seed-k with seeds)
    seed: int | None = None


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
    saved = load_yaml(read_text(saved_path), str(saved_path)) or {}  # bounded (yamlfile.py)
    try:  # as this version reads it: options that moved sections compare at their new place, new ones at defaults
        saved = type(cfg).model_validate(saved).model_dump(mode="json")
    except ValidationError:
        pass  # a config this version cannot read: compared as saved (every difference shows)
    saved = flatten(json.loads(json.dumps(saved)))
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
              report: bool = True, only: list[str] | None = None, seeds: list[int] | None = None) -> list[Outcome]:
    """Train the sweep's unfinished variants one after another, then build its report.

    `only` (variant names) and `seeds` (a subset of the sweep's seeds) train part of a study now — the rest stays
    as it is on disk and in sweep.json, so a long study runs in parts and the report covers every finished run.

    `runner(cfg) -> run_dir` trains one variant (default: `tunelab.train.launch.train`); tests pass their own.
    Returns one `Outcome` per variant, in sweep order; ``sweep.json`` is rewritten after every variant so a
    killed sweep leaves an accurate record.
    """
    from ..console import console
    from ..train.distributed import barrier, is_main
    from ..train.task_eval import check_tasks

    runner = runner or _default_runner
    # with `match:` the configs are written only once the budgets agree, so a refused study writes nothing
    deferred = bool(sweep.match) and not dry_run
    configs = []
    for v in sweep.variants:  # validate everything first: a typo must not surface after hours of training
        try:
            try:
                cfg = resolve(sweep, v, write=not dry_run and not deferred)  # a dry run writes nothing
            except TunelabError:
                if not deferred:
                    raise
                cfg = resolve(sweep, v)  # written after all: the error names the file's line, as without `match`
            check_tasks(cfg)  # every eval task file exists and parses
            configs.append(cfg)
        except TunelabError as e:
            raise TunelabError(f"variant '{v.name}': {e}") from None
    outcomes = [Outcome(v.key, str(v.run_dir), v.overrides, "planned", variant=v.name, seed=v.seed)
                for v in sweep.variants]
    main = is_main()
    _check_selection(sweep, only, seeds)
    clock = _study_clock(sweep)  # the study's own wall time, summed over `tunelab compare` invocations
    budgets = configured_budgets(sweep, configs)
    problem = match_problem(budgets, sweep.match) if sweep.match else None
    if dry_run:
        print_plan(sweep, configs, budgets)
    if problem:  # one line, before anything trains (or is written)
        raise TunelabError(f"{sweep.path or sweep.name}: {problem}")
    if dry_run:  # nothing written: print_plan said what a real run would write
        return outcomes
    if deferred:  # the same text, validated above: now written, each run's config rerunnable by hand
        configs = [resolve(sweep, v) for v in sweep.variants]
    for i, (v, cfg, out) in enumerate(zip(sweep.variants, configs, outcomes), 1):
        state = run_status(v.run_dir)
        if (only and v.name not in only) or (seeds is not None and v.seed not in seeds):
            out.status = "skipped" if state == "done" else "planned"  # not selected now: its record is kept
            continue
        drift = config_drift(v.run_dir, cfg)
        if drift:
            more = " …" if len(drift) > 3 else ""
            out.status = "failed"
            out.error = (f"{v.run_dir} holds a run with a different config ({'; '.join(drift[:3])}{more}); "
                         "delete it to retrain")
            console.print(f"[red]✗ {v.key}: {out.error}[/]")
        elif state == "done":
            out.status = "skipped"
            console.print(f"[dim]✓ [{i}/{len(configs)}] {v.key}: finished earlier, skipped[/]")
        else:
            console.rule(f"[bold][{i}/{len(configs)}] {v.key}" + (" (resuming)" if state == "partial" else ""))
            t0 = time.perf_counter()
            try:
                runner(cfg)
                out.status = "done"
            except _recoverable() as e:
                out.status = "failed"
                out.error = str(e) if isinstance(e, TunelabError) else f"{type(e).__name__}: {e}"
                console.print(f"[red]✗ {v.key} failed: {out.error}[/] — going on with the next variant")
            out.seconds = time.perf_counter() - t0
        if main:
            _save_state(sweep, outcomes, budgets, clock)
        barrier()  # rank 0 has written the variant's results before any rank looks at the next one
    if report and main:
        write_sweep_report(sweep)
    return outcomes


def write_sweep_report(sweep: Sweep) -> Path:
    """(Re)build ``<sweep>/report/`` from the sweep folder; returns the path of index.html."""
    from .report import build_report
    from .results import collect

    from .results import sweep_meta

    # the report folder is the sweep folder's own (tunelab made both): its report files are replaced, as a
    # run's own files are in its run folder, also when an older tunelab wrote them (no ledger entry)
    return build_report(collect([sweep.output_dir]), sweep.report_dir, title=sweep.name,
                        description=sweep.description, study=sweep_meta(sweep.output_dir), overwrite=True)


def _check_selection(sweep: Sweep, only: list[str] | None, seeds: list[int] | None) -> None:
    names = list(dict.fromkeys(v.name for v in sweep.variants))
    unknown = [n for n in only or [] if n not in names]
    if unknown:
        raise TunelabError(f"--only: no variant named '{unknown[0]}' (variants: {', '.join(names)})")
    if seeds is not None:
        if sweep.seeds is None:
            raise TunelabError(f"--seeds: {sweep.path or sweep.name} declares no `seeds:`")
        bad = [s for s in seeds if s not in sweep.seeds]
        if bad:
            raise TunelabError(f"--seeds: {bad[0]} is not one of the study's seeds "
                               f"({', '.join(map(str, sweep.seeds))})")


def configured_budgets(sweep: Sweep, configs: list) -> dict[str, dict]:
    """{variant: configured budget} (one per variant: seeds do not change it), with its declared outside budget."""
    from ..train.accounting import add, configured
    from ..train.pipeline import resolve_stages

    out: dict[str, dict] = {}
    counted = any(q.startswith("flops") for q in sweep.match)  # the parameter counts, only when FLOPs are matched
    for v, cfg in zip(sweep.variants, configs):
        if v.name not in out:
            b = add([configured(s, counted) for _, s, _ in resolve_stages(cfg)]) if cfg.stages else \
                configured(cfg, counted)
            for q, extra in v.budget.items():
                b[q] = (b.get(q) or 0) + extra
            if "flops" not in v.budget and any(q in v.budget for q in ("flops_train", "flops_sampling")):
                b["flops"] = None if None in (b.get("flops_train"), b.get("flops_sampling")) else \
                    b["flops_train"] + b["flops_sampling"]  # the total follows a declared part
            out[v.name] = b
    return out


def print_plan(sweep: Sweep, configs: list, budgets: dict[str, dict] | None = None) -> None:
    """The dry run: each variant × its seeds, their state on disk, and the configured cost per run and in all."""
    from rich.table import Table

    from ..console import console

    budgets = budgets or {}
    groups: dict[str, list] = {}
    for v, cfg in zip(sweep.variants, configs):
        groups.setdefault(v.name, []).append((v, cfg))
    n_seeds = len(sweep.seeds) if sweep.seeds else 1
    title = f"sweep {sweep.name}: {plural(len(groups), 'variant')}" + (f" × {plural(n_seeds, 'seed')}"
                                                                        if sweep.seeds else "")
    table = Table(title=f"{title} → {sweep.output_dir}")
    with_flops = any(q.startswith("flops") for q in sweep.match)  # counted only then (`configured_budgets`)
    right = ("#", "steps", "≤ train tokens", "sampled", "≤ FLOPs", "runs done")
    cols = ("#", "variant", "method", "state", "steps", "≤ train tokens", "sampled") + \
        (("≤ FLOPs",) if with_flops else ()) + (("runs done",) if sweep.seeds else ())
    for col in cols:  # a variant's name is its folder name: show all of it; a state stays on one line
        table.add_column(col, justify="right" if col in right else "left", overflow="fold", no_wrap=col == "state")
    totals = {"tokens": 0, "sampled": 0, "steps": 0, "runs": 0}
    for i, (name, members) in enumerate(groups.items(), 1):
        b = budgets.get(name) or {}
        states = []
        for v, cfg in members:
            state = run_status(v.run_dir)
            states.append("config changed!" if config_drift(v.run_dir, cfg) else state)
        cfg = members[0][1]
        tokens, sampled, steps = b.get("tokens_trained"), b.get("completions_sampled"), b.get("steps")
        for key, val in (("tokens", tokens), ("sampled", sampled), ("steps", steps)):
            totals[key] += (val or 0) * len(members)
        totals["runs"] += len(members)
        shown = sorted(set(states), key=states.index)
        table.add_row(str(i), name, cfg.method if not cfg.stages else "pipeline", ", ".join(shown),
                      str(steps) if steps else f"{cfg.train.epochs:g} ep", f"{tokens:,}" if tokens else "—",
                      f"{sampled:,}" if sampled else "—",
                      *((f"{b['flops']:.3g}" if b.get("flops") else "—",) if with_flops else ()),
                      *((f"{states.count('done')}/{len(members)}",) if sweep.seeds else ()))
    console.print(table)
    console.print(f"{plural(totals['runs'], 'run')}; configured in all: {totals['steps']:,} optimizer steps, at most "
                  f"{totals['tokens']:,} training tokens, {totals['sampled']:,} sampled completions (per run × "
                  f"{plural(n_seeds, 'seed')})")
    configs_dir = sweep.output_dir / "configs"
    console.print(f"dry run: nothing written. A real run writes {plural(len(sweep.variants), 'config')} to "
                  f"{configs_dir} ({', '.join(config_path(sweep, v).name for v in sweep.variants)}), "
                  f"{sweep.output_dir / STATE_FILE} and the runs under {sweep.runs_dir}")


def _study_clock(sweep: Sweep) -> dict:
    """The study's elapsed wall time before this invocation (sweep.json's ``wall_seconds``, ``invocations``) and
    when this one started: `_save_state` records their sum after every variant, so a study run in parts (or killed
    and continued) reports the time of all its invocations together (a killed one's up to its last variant)."""
    try:
        old = json.loads((sweep.output_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        old = {}
    old = old if isinstance(old, dict) else {}
    return {"wall_seconds": float(old.get("wall_seconds") or 0.0), "invocations": int(old.get("invocations") or 0),
            "start": time.perf_counter()}


def _save_state(sweep: Sweep, outcomes: list[Outcome], budgets: dict | None = None,
                clock: dict | None = None) -> None:
    """``sweep.json``: merged with the previous record, so a dry run never erases an earlier error. `clock`
    (`_study_clock`): the study's wall time so far, this invocation's included."""
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
            row = {**old[o.name], "overrides": o.overrides, "run_dir": o.run_dir, "variant": o.variant,
                   "seed": o.seed}
        rows.append(row)
    state = {"name": sweep.name, "description": sweep.description,
             "sweep_file": str(sweep.path) if sweep.path else None, "seeds": sweep.seeds,
             "claims": [c.model_dump() for c in sweep.claims], "match": list(sweep.match),
             "configured_budgets": budgets or {}, "variants": rows}
    if clock:
        state["wall_seconds"] = clock["wall_seconds"] + time.perf_counter() - clock["start"]
        state["invocations"] = clock["invocations"] + 1
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(path)  # atomic: a kill never leaves half a file


def compare_main(sweep_file: str, overrides: list[str] = (), dry_run: bool = False, scale: bool = False,
                 only: list[str] | None = None, seeds: str | None = None, claimed: bool = False) -> int:
    """`tunelab compare`: 0 when every variant finished, 1 when some failed (the report is written anyway).
    `only`: variant names, `claimed`: the variants the claims name, `seeds`: comma-separated seeds — what to train
    now (`run_sweep`); the rest of the study keeps its state."""
    from .sweep import load_sweep

    sweep = load_sweep(sweep_file, overrides, scale=scale)
    names = list(only) if only else None
    if claimed:
        if not sweep.claims:
            raise TunelabError(f"--claimed: {sweep_file} declares no `claims:`")
        names = (names or []) + [n for c in sweep.claims for n in (c.better, c.than)]
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()] if seeds else None
    except ValueError:
        raise TunelabError(f"--seeds: {seeds!r} is not a comma-separated list of integers") from None
    outcomes = run_sweep(sweep, dry_run=dry_run, only=names, seeds=seed_list)
    if dry_run:
        return 0
    failed = [o for o in outcomes if o.status == "failed"]
    from ..train.distributed import is_main

    if not is_main():  # under torchrun every rank has the same outcomes; rank 0 reports them
        return 1 if failed else 0
    for o in failed:
        print(f"failed: {o.name}: {o.error}")
    print_verdicts(sweep)
    print(f"{len(outcomes) - len(failed)}/{plural(len(outcomes), 'run')} finished; report: {sweep.report_dir / 'index.html'}")
    return 1 if failed else 0


def print_verdicts(sweep: Sweep) -> None:
    """The provenance warning (one line, when runs differ) and one line per claim."""
    from .claims import evaluate_claims, provenance_summary
    from .study import claim_line
    from .results import collect

    runs = collect([sweep.output_dir])
    _, warnings = provenance_summary(runs)
    for w in warnings:
        print(f"warning: {w}")
    for row in evaluate_claims(runs, sweep.claims) if sweep.claims else []:
        print(claim_line(row))

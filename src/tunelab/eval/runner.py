"""Run a list of tasks on one model: dispatch by kind, cache base results, print a table, save JSON.

Every scorer returns the same shape, which `run_tasks` completes with bookkeeping::

    {"task": "gsm", "kind": "exact", "n": 100,
     "metrics": {"exact_match": 0.12, "answer_found": 0.9}, "primary": "exact_match",
     "higher_is_better": {"exact_match": true, ...},
     "samples": [...first few items, for eyeballing...], "details": {...kind-specific counts...},
     "limit": null, "task_hash": "…", "template": "chatml", "seconds": 41.2, "cached": false}

`run_tasks` returns ``{task name: result}``; the same dict is what `forgetting.learning_forgetting` reads.
Names starting with ``harness:`` (``harness:hellaswag``) are handed to lm-eval-harness via `harness.run_harness`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..console import phase
from ..data.templates import Template, get_template
from ..errors import TunelabError
from ..userfiles import write_file
from .choice import evaluate_choice
from .code import evaluate_code, require_code_execution
from .exact import evaluate_exact
from .forgetting import EvalCache, higher_is_better
from .perplexity import evaluate_perplexity
from .tasks import Task, load_task

HARNESS_PREFIX = "harness:"


def _evaluate(model, tokenizer, template, task: Task, limit, allow_code_execution: bool, sandbox: str) -> dict:
    if task.kind == "perplexity":
        return evaluate_perplexity(model, tokenizer, template, task, limit)
    if task.kind == "choice":
        return evaluate_choice(model, tokenizer, template, task, limit)
    if task.kind == "exact":
        return evaluate_exact(model, tokenizer, template, task, limit)
    return evaluate_code(model, tokenizer, template, task, limit, allow_code_execution=allow_code_execution,
                         sandbox=sandbox)


def validate_tasks(tasks, allow_code_execution: bool = False, sandbox: str = "bwrap") -> tuple[list[Task], list[str]]:
    """Load every task (raising `TunelabError` for any problem) → (tunelab tasks, lm-eval task names).

    Cheap (no model): call it before a training run starts so a typo in ``eval.target`` fails in seconds.
    """
    names = [t.name if isinstance(t, Task) else str(t) for t in tasks]
    harness = [n[len(HARNESS_PREFIX):] for n in names if n.startswith(HARNESS_PREFIX)]
    loaded = [load_task(t) for t, n in zip(tasks, names) if not n.startswith(HARNESS_PREFIX)]
    seen = set()
    for task in loaded:
        if task.name in seen:
            raise TunelabError(f"task '{task.name}' is listed twice")
        seen.add(task.name)
        if task.kind == "code":
            require_code_execution(task.name, allow_code_execution, sandbox)
    return loaded, harness


def run_tasks(model, tokenizer, template: Template | str | None, tasks, *, allow_code_execution: bool = False,
              limit: int | None = None, cache: EvalCache | None = None, model_key: str | None = None,
              harness_include_path: str | None = None, verbose: bool = True, sandbox: str = "bwrap") -> dict:
    """Evaluate `model` on `tasks` (bundled names, task YAML paths, `Task`s or ``harness:<name>``).

    `template` is the model's chat template (a `Template`, or a name for `get_template`; None = ``auto``).
    `limit` caps records per task (default: each task's own ``limit``, else all).
    `cache` + `model_key` (see `forgetting.model_fingerprint`) reuse stored results — pass them for the
    *base* model only: a trained model's weights change while its reference may not.
    Every task is loaded and validated, and code tasks are checked against `allow_code_execution`, before any
    model time is spent; `sandbox` is where code tasks run (``bwrap``, or the explicit ``unsafe_inprocess``).
    """
    if cache is not None and not model_key:
        raise ValueError("run_tasks: a cache needs a model_key (e.g. forgetting.model_fingerprint(ref))")
    if not isinstance(template, Template):
        template = get_template(template or "auto", tokenizer)
    loaded, harness = validate_tasks(tasks, allow_code_execution, sandbox)
    results: dict = {}
    for task in loaded:
        tpl = get_template(task.spec.template, tokenizer) if task.spec.template else template
        task_hash = task.fingerprint()
        key = cache.key(model_key, task.name, task_hash, limit, tpl.jinja) if cache is not None else None
        res = cache.get(key) if key else None
        if res is not None:
            res["cached"] = True
        else:
            t0 = time.perf_counter()
            with phase(f"evaluating task {task.name} ({task.kind})"):
                res = _evaluate(model, tokenizer, tpl, task, limit, allow_code_execution, sandbox)
            res = {"task": task.name, "kind": task.kind, **res, "limit": limit or task.spec.limit,
                   "task_hash": task_hash, "template": tpl.name, "seconds": time.perf_counter() - t0,
                   "cached": False}
            if key:
                cache.put(key, res)
        results[task.name] = res
        if verbose:
            _say(res)
    if harness:
        from .harness import run_harness

        results.update(run_harness(model, tokenizer, harness, template=template, include_path=harness_include_path,
                                   limit=limit))
    return results


def _say(res: dict) -> None:
    from ..console import console

    m = res["primary"]
    how = "cached" if res.get("cached") else f"{res.get('seconds', 0):.1f}s"
    console.print(f"eval {res['task']}: {m} = {_fmt(res['metrics'][m])} (n={res['n']}, {how})")


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def results_table(results: dict, base: dict | None = None, title: str = "evaluation"):
    """A rich Table: one row per task (primary metric first), with base value and improvement if `base`."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "kind", "n", "metric", "value"):
        table.add_column(col, justify="right" if col in ("n", "value") else "left")
    if base:
        table.add_column("base", justify="right")
        table.add_column("improvement", justify="right")
    table.add_column("other metrics")
    for name, res in results.items():
        m = res.get("primary") or next(iter(res["metrics"]), None)
        v = res["metrics"].get(m)
        arrow = "↑" if higher_is_better(m, res) else "↓"
        others = ", ".join(f"{k}={_fmt(x)}" for k, x in res["metrics"].items() if k != m)
        row = [name, res.get("kind", ""), str(res.get("n", "")), f"{m} {arrow}", _fmt(v)]
        if base:
            b = base.get(name, {}).get("metrics", {}).get(m)
            if b is None or v is None:
                row += ["—", "—"]
            else:
                imp = (v - b) * (1 if higher_is_better(m, res) else -1)
                style = "green" if imp > 0 else "red" if imp < 0 else ""
                row += [_fmt(b), f"[{style}]{imp:+.4f}[/]" if style else f"{imp:+.4f}"]
        table.add_row(*row, others)
    return table


def print_results(results: dict, base: dict | None = None, title: str = "evaluation") -> None:
    from rich.console import Console

    Console().print(results_table(results, base, title))


def save_results(results: dict, path: str | Path, overwrite: bool = False, **extra) -> Path:
    """Write ``{"tasks": results, **extra}`` as JSON (e.g. extra = model reference, learning/forgetting);
    an existing file tunelab did not write is replaced only with `overwrite` (`userfiles.write_file`)."""
    return write_file(Path(path), json.dumps({**extra, "tasks": results}, indent=2, default=str), "--output",
                      overwrite)

"""Learning and forgetting, measured in every run that declares `eval.target` / `eval.source` tasks.

Before training, the *base* model is evaluated on every task — with the adapter switched off
(`adapters.base.disabled`), so methods whose initialisation is not an exact identity (LoReFT) still measure the
true base — and the result is cached on disk per (base model, task, task data, limit), so a sweep of twenty
variants evaluates the base once. After training the same tasks run on the trained model, and the run's
`results.json` records

    learning  = mean relative improvement on the target tasks   (> 0: the run learned)
    forgetting = mean relative degradation on the source tasks  (> 0: the run forgot)

with per-task deltas under `learning` / `forgetting` and raw numbers under `eval.base` / `eval.final`.

Per-item scores go to ``<run>/eval/<task>.items.jsonl``: one row per item and phase, ``{"id", "phase": "before" |
"after", "score", …}`` (ids from `eval.tasks.item_id`, stable across runs), so two runs — or a run's before and
after — can be compared item by item (`tunelab.lab.stats`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..adapters.base import disabled, has_adapter
from ..eval import (EvalCache, load_task, model_fingerprint, print_results, run_results_fields, run_tasks,
                    validate_tasks)


def task_names(cfg) -> list[str]:
    return list(dict.fromkeys([*cfg.eval.target, *cfg.eval.source]))


def check_tasks(cfg) -> None:
    """Fail fast (before anything is written) on an unknown task or missing --allow-code-execution."""
    if task_names(cfg):
        validate_tasks(task_names(cfg), cfg.eval.allow_code_execution, cfg.eval.sandbox)


def evaluate_base(cfg, model, tokenizer, template) -> dict | None:
    if not task_names(cfg):
        return None
    key = model_fingerprint(cfg.model.name, f"{cfg.model.dtype}|{cfg.model.device}")
    ctx = disabled(model) if has_adapter(model) else contextlib.nullcontext()
    with ctx:
        return run_tasks(model, tokenizer, template, task_names(cfg), allow_code_execution=cfg.eval.allow_code_execution,
                         limit=cfg.eval.limit, cache=EvalCache(), model_key=key, sandbox=cfg.eval.sandbox)


def evaluate_final(cfg, model, tokenizer, template, base: dict | None) -> dict:
    """Fields for results.json (empty when the run declares no tasks)."""
    if base is None:
        return {}
    final = run_tasks(model, tokenizer, template, task_names(cfg), allow_code_execution=cfg.eval.allow_code_execution,
                      limit=cfg.eval.limit, sandbox=cfg.eval.sandbox)
    print_results(final, base=base, title="learning (target) and forgetting (source)")
    name = {t: load_task(t).name for t in task_names(cfg)}  # results are keyed by task name, not YAML path
    fields = run_results_fields(base, final, [name[t] for t in cfg.eval.target], [name[t] for t in cfg.eval.source])
    fields["eval"]["base_cached"] = all(r.get("cached", False) for r in base.values())
    from .distributed import is_main

    if is_main():
        write_items(Path(cfg.output_dir), base, final)
    return fields


def write_items(out: Path, base: dict, final: dict) -> list[Path]:
    """``eval/<task>.items.jsonl`` for every task whose results carry per-item scores (see the module docstring);
    written to a temporary file and renamed, like results.json."""
    paths = []
    for task, res in final.items():
        rows = [{"phase": "before", **it} for it in (base.get(task) or {}).get("items") or []]
        rows += [{"phase": "after", **it} for it in res.get("items") or []]
        if not rows:
            continue  # an lm-eval-harness task: no per-item scores
        folder = out / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{task.replace('/', '_')}.items.jsonl"
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
        tmp.replace(path)
        paths.append(path)
    return paths


def evaluate_during(cfg, model, tokenizer, template) -> dict:
    """Target-task metrics at an `eval_every` step, flattened for metrics.jsonl (`task/metric`: value),
    so curves like "exact-match recall vs steps" come straight from the log (`eval.during_training`)."""
    if not (cfg.eval.during_training and cfg.eval.target):
        return {}
    res = run_tasks(model, tokenizer, template, cfg.eval.target, allow_code_execution=cfg.eval.allow_code_execution,
                    limit=cfg.eval.limit, verbose=False, sandbox=cfg.eval.sandbox)
    return {f"{name}/{k}": v for name, r in res.items() for k, v in r["metrics"].items()
            if isinstance(v, (int, float))}

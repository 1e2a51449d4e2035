"""Learning and forgetting: how much a fine-tune improved what it targeted and degraded what it already knew.

Evaluate the base model and the trained model on two task lists:

* ``target`` — what the fine-tune is for (e.g. the held-out split of the training task);
* ``source`` — what the base model could already do and should keep (prose, code, general knowledge).

**Sign convention.** Per task, on its primary metric (``loss`` for perplexity tasks, ``acc_norm`` for
multiple choice, ``exact_match``, ``pass@1``):

    change       = trained − base                       (raw, in the metric's units)
    improvement  = +change  if higher is better          (accuracy, exact match, pass@k)
                   −change  if lower is better           (loss, perplexity)
    relative     = improvement / |base|                  (None when base is 0)

so ``improvement > 0`` always means "better" whatever the metric. The summary numbers are unitless, so loss
and accuracy tasks can be averaged:

    learning   =  mean relative improvement over target tasks   (> 0: the fine-tune learned its task)
    forgetting = −mean relative improvement over source tasks   (> 0: source tasks got worse)

Tasks whose base value is 0 (e.g. exact match of a base model that never answers) have no relative change;
they are left out of the means and their absolute ``improvement`` is still reported per task.

**Base-result cache.** A sweep trains many variants of one base model; the base model's scores are the same
every time. `EvalCache` stores each task's result as JSON under ``$TUNELAB_CACHE/eval`` (default
``~/.cache/tunelab/eval``), keyed by the base model's fingerprint, the task name, a hash of the task file and
its data, the record limit, the template and the scorer version — change any of them and it is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

SCORER_VERSION = 2  # bump when a scorer changes what it computes, to invalidate cached base results
# (2: results carry per-item scores, "items")
_LOWER_IS_BETTER = {"loss", "perplexity", "nll", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter"}


def higher_is_better(metric: str, result: dict | None = None) -> bool:
    """Direction of `metric`: the result's own ``higher_is_better`` entry, else known loss-type names."""
    if result and metric in result.get("higher_is_better", {}):
        return bool(result["higher_is_better"][metric])
    return metric.split(",")[0] not in _LOWER_IS_BETTER  # lm-eval names look like "acc,none"


def task_delta(base: dict, trained: dict, metric: str | None = None) -> dict:
    """Base vs trained on one task's result dicts (as returned by `run_tasks`), with the sign convention."""
    metric = metric or base.get("primary") or next(iter(base["metrics"]))
    b, t = float(base["metrics"][metric]), float(trained["metrics"][metric])
    sign = 1.0 if higher_is_better(metric, base) else -1.0
    improvement = sign * (t - b)
    return {"metric": metric, "higher_is_better": sign > 0, "base": b, "trained": t, "change": t - b,
            "improvement": improvement, "relative": improvement / abs(b) if b else None}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def learning_forgetting(base: dict, trained: dict, target: list[str] = (), source: list[str] = ()) -> dict:
    """Learning on `target` and forgetting on `source` from two `run_tasks` result dicts (name → result).

    Returns ``{"learning", "forgetting", "target": {task: delta}, "source": {task: delta}}`` where each
    delta is `task_delta`'s dict; ``learning``/``forgetting`` are None when no task has a nonzero base.
    """
    missing = [t for t in list(target) + list(source) if t not in base or t not in trained]
    if missing:
        raise KeyError(f"no base and trained results for task(s): {', '.join(missing)}")
    tgt = {t: task_delta(base[t], trained[t]) for t in target}
    src = {t: task_delta(base[t], trained[t]) for t in source}
    learning = _mean([d["relative"] for d in tgt.values() if d["relative"] is not None])
    gain_src = _mean([d["relative"] for d in src.values() if d["relative"] is not None])
    return {"learning": learning, "forgetting": None if gain_src is None else -gain_src,
            "target": tgt, "source": src,
            "convention": "improvement > 0 is better; learning > 0 = target improved; forgetting > 0 = source "
                          "got worse (relative to the base value)"}


def run_results_fields(base: dict, trained: dict, target: list[str] = (), source: list[str] = ()) -> dict:
    """The learning/forgetting entries a training run writes into its ``results.json`` (read by `tunelab.lab`).

    ``learning_score``/``forgetting_score`` are `learning_forgetting`'s summary numbers; ``learning`` and
    ``forgetting`` map each target/source task to its `task_delta` (``improvement > 0`` = better, for both);
    ``eval`` holds every task's metrics before (``base``) and after (``final``) training.
    """
    lf = learning_forgetting(base, trained, target, source)
    return {"learning_score": lf["learning"], "forgetting_score": lf["forgetting"],
            "learning": lf["target"], "forgetting": lf["source"],
            "eval": {"base": {t: r["metrics"] for t, r in base.items()},
                     "final": {t: r["metrics"] for t, r in trained.items()}}}


def model_fingerprint(ref: str, extra: str = "") -> str:
    """A stable id for a model reference: local files by name, size and mtime; hub ids/aliases by name.

    `extra` folds in anything else that changes scores (dtype, device type): ``model_fingerprint(ref,
    "bfloat16")``. Weights are not hashed (gigabytes); a file rewritten in place changes size or mtime.
    """
    path = Path(ref).expanduser()
    h = hashlib.sha256(f"{ref}|{extra}".encode())
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            h.update(f"{p.relative_to(path) if p != path else p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    else:
        from ..models.aliases import ALIASES

        if ref in ALIASES:  # an alias resolves to a packaged GGUF; its version is in its path
            from ..models.aliases import alias_gguf

            try:
                g = alias_gguf(ref)
                h.update(f"{g}:{g.stat().st_size}".encode())
            except Exception:  # the fingerprint must not fail where loading would give the real error
                pass
    return h.hexdigest()[:16]


class EvalCache:
    """Task results on disk, one JSON file per key (see the module docstring)."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from ..models.load import cache_dir

            root = cache_dir() / "eval"
        self.root = Path(root).expanduser()

    @staticmethod
    def key(model_key: str, task_name: str, task_hash: str, limit: int | None, template: str = "") -> str:
        """Cache key of one (model, task, task content, limit, template) combination."""
        blob = json.dumps({"model": model_key, "task": task_name, "task_hash": task_hash, "limit": limit,
                           "template": hashlib.sha256(template.encode()).hexdigest()[:16],
                           "version": SCORER_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The stored result, or None (also for an unreadable file: it is simply recomputed)."""
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, result: dict) -> None:
        """Store atomically (write a temp file, then rename), so concurrent sweeps never read half a file."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, self._path(key))

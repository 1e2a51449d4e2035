"""What a run consumed (its budget) and where it came from (its provenance): two entries of ``results.json``.

**Budget** (``results.json["budget"]``), measured by the run:

    steps               optimizer steps taken
    sequences_trained   rows the loop trained on: steps × batch_size × grad_accum × ranks (a packed row counts once)
    tokens_trained      non-padding tokens in those rows (the loop's own count)
    completions_sampled completions sampled from the policy during training (online objectives: rollout rounds ×
                        prompts_per_step × group_size; 0 for offline ones)
    tokens_sampled      completion tokens in them (Σ over rounds of the round's mean completion length × its count)
    reward_model_calls  completions scored by a ``reward_model`` reward (one call per completion per such reward)
    flops_train         ≈ tokens_trained × (4·N + 2·N_trainable)  +  reference forwards 2·N × tokens_trained
    flops_sampling      ≈ 2·N × tokens_sampled
    wall_seconds, cpu_seconds   from the start of the run, summed over its parts (a run resumed or extended:
                        each checkpoint carries the seconds up to it, `loop.fit`; a part's time after its last
                        checkpoint — the steps a kill lost — is not counted)
    peak_rss_mb         this process's peak (a resumed run: this part's)

**The FLOP estimate** follows Kaplan et al. 2020 (arXiv 2001.08361, §2.1): a forward pass costs ≈ 2·N FLOPs per
token for N parameters (one multiply-add per weight), the backward pass twice that — 2·N for the gradients with
respect to the activations, which every layer needs, and 2·N for the gradients of the weights, which only
*trainable* weights need. Full finetuning: 6·N per token; an adapter (N_trainable ≪ N): ≈ 4·N. A frozen forward
(the reference model of DPO/KTO or a KL penalty, rl.beta > 0) adds 2·N per trained token; sampling costs 2·N per
generated token (the prompt's prefill and attention's quadratic term are left out — at these lengths they
are small, and they are the same for the variants a study compares). It is an estimate for *comparing budgets*,
not a hardware counter.

**Configured budget** (`configured`): the same quantities computed from a resolved config *before* anything
runs — what `tunelab compare` checks when a study declares ``match: [...]``. Steps of an ``epochs:`` run come
from the number of training records (unpacked; None when data is packed or not a local file).

**Provenance** (``results.json["provenance"]``): `tunelab.machine.provenance()` (versions, git commit, machine)
plus sha256 of the run's config.yaml, of its training/held-out data files and each eval task's fingerprint.
"""

from __future__ import annotations

import hashlib
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from ..jsonl import read_rows
from ..machine import provenance

QUANTITIES = ("steps", "sequences_trained", "tokens_trained", "completions_sampled", "tokens_sampled",
              "reward_model_calls")
_ROWS_PER_ROUND = {"policy_gradient": "PG", "ppo": "PG", "best_of_n": "BEST", "pairs": "PAIRS"}


@dataclass
class Usage:
    """Process counters at the start of a run (`start`), so a sweep's later runs count only their own part."""

    wall: float
    cpu: float

    @staticmethod
    def start() -> "Usage":
        _reset_peak_rss()
        return Usage(time.perf_counter(), _cpu())

    def seconds(self) -> dict:
        return {"wall_seconds": time.perf_counter() - self.wall, "cpu_seconds": _cpu() - self.cpu,
                "peak_rss_mb": _peak_rss_mb()}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reset_peak_rss() -> None:
    """Linux ≥ 4.0: writing 5 to clear_refs resets VmHWM, so the next peak is this run's, not the sweep's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux: the process's lifetime peak


def _reward_models(cfg) -> int:
    return sum(1 for r in (cfg.rl.rewards or []) if r.get("name") == "reward_model")


def _rollout_mode(cfg) -> str | None:
    from ..objectives import objective_class

    return getattr(objective_class(cfg.objective), "row_builder", None)  # rl/rows/: the kind of round it trains on


def _keep(cfg) -> str:
    from ..objectives import objective_class

    return objective_class(cfg.objective).options(cfg).keep  # rejection_sampling's own section


def uses_frozen_forward(cfg) -> bool:
    from ..objectives import objective_class

    cls = objective_class(cfg.objective)
    wants = getattr(cls, "wants_reference", None)
    try:
        return bool(wants(cfg)) if wants else bool(getattr(cls, "needs_reference", False))
    except Exception:
        return False


def flops(n_total: int | None, n_trainable: int | None, tokens_trained: int, tokens_sampled: float,
          frozen_forward: bool) -> dict:
    """The estimate of the module docstring; None when the parameter count is unknown."""
    if not n_total:
        return {"flops_train": None, "flops_sampling": None}
    train = tokens_trained * (4 * n_total + 2 * (n_trainable or 0)) + (2 * n_total * tokens_trained
                                                                        if frozen_forward else 0)
    return {"flops_train": float(train), "flops_sampling": float(2 * n_total * tokens_sampled)}


def consumed(cfg, res, usage: Usage, out: Path, n_total: int | None, n_trainable: int | None,
             world: int = 1) -> dict:
    """The run's ``budget`` entry (see the module docstring) from the loop's result and its metrics.jsonl."""
    rows = read_rows(Path(out) / "metrics.jsonl")
    rounds: dict[int, float] = {}
    for r in rows:  # a rollout round's metrics ride on every training row it fed
        if "loss" in r and "round" in r and "completion_length" in r:
            rounds[int(round(r["round"]))] = float(r["completion_length"])
    per_round = cfg.rl.prompts_per_step * cfg.rl.group_size if _rollout_mode(cfg) else 0
    completions = per_round * len(rounds)
    tokens_sampled = sum(length * per_round for length in rounds.values())
    budget = {"steps": res.steps, "sequences_trained": res.steps * cfg.train.batch_size * cfg.train.grad_accum * world,
              "tokens_trained": res.tokens, "completions_sampled": completions,
              "tokens_sampled": round(tokens_sampled), "reward_model_calls": completions * _reward_models(cfg)}
    budget.update(flops(n_total, n_trainable, res.tokens, tokens_sampled, uses_frozen_forward(cfg)))
    budget.update(usage.seconds())
    for key, before in (getattr(res, "earlier", None) or {}).items():  # a resumed or extended run's earlier parts
        if budget.get(key) is not None:
            budget[key] += before
    return budget


def _local_rows(path: str | None, limit: int | None) -> int | None:
    if not path or not Path(path).is_file():
        return None
    from ..data.sources import load_records

    try:
        return len(load_records(path, limit=limit))
    except Exception:  # the run's own validation reports a bad file; a budget estimate must not
        return None


def configured(cfg) -> dict:
    """The budget a single-stage config asks for (module docstring), before running (a pipeline: `add` its
    stages' budgets)."""
    t, rl = cfg.train, cfg.rl
    mode = _rollout_mode(cfg)
    micro = t.batch_size
    steps = t.max_steps
    if mode:
        per_group = {"pairs": 1, "best_of_n": 1 if mode == "best_of_n" and _keep(cfg) == "best" else rl.group_size}
        units = rl.prompts_per_step * per_group.get(mode, rl.group_size)  # the most rows a round yields
        per_epoch = rl.ppo_epochs * math.ceil(units / micro)  # micro-batches per rollout round
    else:
        n = _local_rows(cfg.data.train, cfg.data.limit)
        if n is not None and not cfg.data.eval:
            n -= min(cfg.data.eval_max, int(round(n * cfg.data.eval_fraction)))
        per_epoch = math.ceil(n / micro) if n is not None and not cfg.data.packing else None
    if not steps:
        steps = max(1, math.ceil(t.epochs * per_epoch / t.grad_accum)) if per_epoch else None
    rounds = math.ceil(steps * t.grad_accum / per_epoch) if mode and steps else 0
    completions = rounds * rl.prompts_per_step * rl.group_size if mode else 0
    return {"steps": steps, "sequences_trained": steps * micro * t.grad_accum if steps else None,
            "tokens_trained": steps * micro * t.grad_accum * cfg.data.max_length if steps else None,  # an upper bound
            "completions_sampled": completions, "tokens_sampled": completions * rl.max_new_tokens if mode else 0,
            "reward_model_calls": completions * _reward_models(cfg)}


def add(parts: list[dict]) -> dict:
    """Budgets summed quantity by quantity (None when any part's is unknown): a pipeline's stages."""
    return {q: None if any(p.get(q) is None for p in parts) else sum(p[q] for p in parts) for q in QUANTITIES}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_provenance(cfg, out: Path) -> dict:
    """`machine.provenance()` + hashes of what the run read: config.yaml, data files, eval tasks."""
    prov = provenance()
    files = {}
    for key, path in (("config.yaml", Path(out) / "config.yaml"), ("data.train", cfg.data.train),
                      ("data.eval", cfg.data.eval)):
        if path and Path(path).is_file():
            files[key] = sha256_file(Path(path))
        elif path:
            files[key] = f"not a local file: {path}"  # a hub dataset: its name (and the datasets version) is all
    from .task_eval import task_names

    if task_names(cfg):
        from ..eval import load_task

        for name in task_names(cfg):
            if not name.startswith("harness:"):
                task = load_task(name)
                files[f"task:{task.name}"] = task.fingerprint()
    prov["hashes"] = files
    return prov

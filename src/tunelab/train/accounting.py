"""What a run consumed (its budget) and where it came from (its provenance): two entries of ``results.json``.

**Budget** (``results.json["budget"]``), measured by the run:

    steps               optimizer steps taken
    sequences_trained   rows the loop trained on: steps × batch_size × grad_accum × ranks (a packed row counts once)
    tokens_trained      non-padding tokens in those rows (the loop's own count)
    completions_sampled completions sampled from the policy during training (online objectives: rollout rounds ×
                        prompts_per_step × group_size; 0 for offline ones)
    tokens_sampled      completion tokens in them (the rollout source counts both, every rank's and every
                        sampling pass's, dynamic sampling's extra ones included; the held-out measures are not)
    reward_model_calls  completions scored by a ``reward_model`` reward (one call per completion per such reward;
                        the training rollouts', as above — the held-out measures' are left out with their samples)
    flops_train         training FLOPs, `flops` below, on tokens_trained
    flops_sampling      sampling FLOPs, `flops` below, on tokens_sampled
    flops               flops_train + flops_sampling
    wall_seconds, cpu_seconds   this run's process time, summed over its invocations (below)
    peak_rss_mb         the largest peak resident memory of any of its invocations
    invocations         the processes whose work the result holds: 1, + 1 per resume or extension (one killed before
                        its first checkpoint left nothing to continue from and is not counted)

**Resumed runs** add up. A run killed and started again continues from its latest checkpoint, and every
checkpoint stores the running totals of the quantities above that the loop's state does not already hold
(`Usage.snapshot`: wall and CPU seconds, peak RSS, invocations); the resumed invocation starts from them
(`Usage.restore`). Steps and tokens come back with the loop's position, the sampling counts with the rollout
source's state. The work a killed invocation did *after* its last checkpoint is redone and counted once, by the
invocation that redid it — the totals describe the run that produced the result.

**The FLOP estimate** (`flops`) follows Kaplan et al. 2020 (arXiv 2001.08361, §2.1; the same convention as the
Chinchilla paper's C ≈ 6·N·D, Hoffmann et al. 2022, arXiv 2203.15556, appendix F): a forward pass costs ≈ 2·N
FLOPs per token for N parameters (one multiply-add per weight), the backward pass twice that — 2·N for the
gradients with respect to the activations, which every layer needs (the gradient flows back through frozen
weights to reach an adapter below them), and 2·N for the gradients of the weights, which only *trainable* weights
need. Per trained token:

    full finetuning (N_trainable = N)           6·N
    an adapter (N = N_base + N_trainable)       (2 forward + 2 backward-activation)·N + 2·N_trainable
                                                = 4·N_base + 6·N_trainable   (the adapter's own weights: all three)
    a frozen forward (the reference model of DPO/KTO, or a KL penalty: rl.beta > 0)   + 2·N
    sampling, per generated token               2·N

The prompt's prefill and attention's quadratic term are left out — at these lengths they are small, and they are
the same for the variants a study compares. It is an estimate for *comparing budgets*, not a hardware counter.
One function computes it for the configured budget (before training) and the consumed one (results.json).

**Configured budget** (`configured`): the same quantities computed from a resolved config *before* anything
runs — what `tunelab compare` checks when a study declares ``match: [...]``. Steps of an ``epochs:`` run come
from the number of training records (unpacked; None when data is packed or not a local file). Tokens are upper
bounds (every row max_length long, every completion max_new_tokens), so the configured FLOPs are too. N and
N_trainable come from the model's config.json alone (`parameter_counts`: the architecture built on the meta
device — shapes, no weights — with the run's method applied to it, so they equal the run's own report).

**Provenance** (``results.json["provenance"]``): `tunelab.machine.provenance()` (versions, git commit, machine)
plus sha256 of the run's config.yaml, of its training/held-out data files and each eval task's fingerprint.
"""

from __future__ import annotations

import hashlib
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import method_options
from ..jsonl import read_rows
from ..machine import provenance

QUANTITIES = ("steps", "sequences_trained", "tokens_trained", "completions_sampled", "tokens_sampled",
              "reward_model_calls", "flops_train", "flops_sampling", "flops")
_ROWS_PER_ROUND = {"policy_gradient": "PG", "ppo": "PG", "best_of_n": "BEST", "pairs": "PAIRS"}


@dataclass
class Usage:
    """Process counters at the start of this invocation of a run (`start`), so a sweep's later runs count only their
    own part, plus the totals of the run's earlier invocations (`restore`, from the checkpoint it resumed from)."""

    wall: float
    cpu: float
    before: dict = field(default_factory=dict)  # what `snapshot` returned when the resumed checkpoint was written

    @staticmethod
    def start() -> "Usage":
        _reset_peak_rss()
        return Usage(time.perf_counter(), _cpu())

    def restore(self, saved: dict | None) -> None:
        """Resuming: the totals a checkpoint stored become this invocation's starting point (None: a checkpoint
        written before tunelab recorded them — this invocation's own part is all that is known)."""
        self.before = dict(saved or {})

    def snapshot(self) -> dict:
        """Totals over every invocation so far: seconds summed, the peak RSS the largest, invocations counted.
        What a checkpoint stores, and what results.json records at the end."""
        b = self.before
        peaks = [p for p in (b.get("peak_rss_mb"), _peak_rss_mb()) if p is not None]
        return {"wall_seconds": b.get("wall_seconds", 0.0) + time.perf_counter() - self.wall,
                "cpu_seconds": b.get("cpu_seconds", 0.0) + _cpu() - self.cpu,
                "peak_rss_mb": max(peaks) if peaks else None, "invocations": b.get("invocations", 0) + 1}


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


def flops(n_total: int | None, n_trainable: int | None, tokens_trained: float | None, tokens_sampled: float | None,
          frozen_forward: bool) -> dict:
    """The FLOP estimate of the module docstring (Kaplan et al. 2020, §2.1), for a configured budget and a consumed
    one alike: ``flops_train`` = T_train·(4·N + 2·N_trainable) [+ 2·N·T_train with a frozen forward],
    ``flops_sampling`` = 2·N·T_sampled, ``flops`` their sum. N counts every parameter the forward touches, an
    adapter's included (so 4·N + 2·N_trainable = 4·N_base + 6·N_trainable); full finetuning (N_trainable = N)
    gives 6·N. A part is None when its token count or N is unknown."""
    train = sampling = None
    if n_total and tokens_trained is not None:
        per_token = 4 * n_total + 2 * (n_trainable or 0) + (2 * n_total if frozen_forward else 0)
        train = float(tokens_trained * per_token)
    if n_total and tokens_sampled is not None:
        sampling = float(2 * n_total * tokens_sampled)
    total = None if train is None or sampling is None else train + sampling
    return {"flops_train": train, "flops_sampling": sampling, "flops": total}


_COUNTS: dict[tuple, tuple[int | None, int | None]] = {}


def parameter_counts(cfg) -> tuple[int | None, int | None]:
    """(N, N_trainable) of `cfg`'s model under its method, from the model's config.json only: the architecture is
    built on the meta device (shapes without storage: nothing is read but the config, nothing allocated) and the
    run's own `apply_method` wraps it, so the counts are the ones the run reports (``total_params``,
    ``trainable_params``; an objective's own head — a reward model's scalar one — is left out, a few thousand
    parameters). (None, None) when the config cannot be read before training (no such folder, a hub model not
    in the local cache while offline) or the method cannot be applied without weights."""
    options = method_options(cfg)
    key = (cfg.model.name, cfg.model.trust_remote_code, cfg.method,
           options.model_dump_json() if options is not None else None)
    if key not in _COUNTS:
        _COUNTS[key] = _meta_counts(cfg, options)
    return _COUNTS[key]


def _meta_counts(cfg, options) -> tuple[int | None, int | None]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..adapters.base import apply_method
    from ..models.load import resolve

    try:
        folder = resolve(cfg.model.name)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
            report = apply_method(model, cfg.method, options)
    except Exception:  # the run itself reports a model or method it cannot use; an estimate must not
        return None, None
    return report.total, report.trainable


def sampled_totals(source, engine) -> dict | None:
    """What the run's batch source sampled to train on — its own count (`rl.rollout.RolloutSource.sampled`,
    carried through checkpoints), summed over ranks — or None: a source that samples nothing, or a run resumed
    from a checkpoint written before the count existed. Every rank calls it (a collective under torchrun)."""
    if not hasattr(source, "sampled"):
        return None
    mine = source.sampled
    known, completions, tokens = engine.all_sum(float(mine is not None), *((mine["completions"], mine["tokens"])
                                                                             if mine is not None else (0, 0)))
    if known < engine.world:
        return None
    return {"completions": int(completions), "tokens": int(tokens)}


def consumed(cfg, res, usage: Usage, out: Path, n_total: int | None, n_trainable: int | None,
             world: int = 1, sampled: dict | None = None) -> dict:
    """The run's ``budget`` entry (see the module docstring) from the loop's result, the source's count of what it
    sampled (`sampled_totals`) and, without that count, the rollout rounds logged in metrics.jsonl (a round whose
    steps all went unlogged, log_every > 1, is missed there, and so are dynamic sampling's extra passes)."""
    per_round = cfg.rl.prompts_per_step * cfg.rl.group_size if _rollout_mode(cfg) else 0
    if sampled is not None:
        completions, tokens_sampled = sampled["completions"], sampled["tokens"]
    else:
        rounds: dict[int, float] = {}
        for r in read_rows(Path(out) / "metrics.jsonl"):  # a rollout round's metrics ride on every row it fed
            if "loss" in r and "round" in r and "completion_length" in r:
                rounds[int(round(r["round"]))] = float(r["completion_length"])
        completions = per_round * len(rounds)
        tokens_sampled = sum(length * per_round for length in rounds.values())
    budget = {"steps": res.steps, "sequences_trained": res.steps * cfg.train.batch_size * cfg.train.grad_accum * world,
              "tokens_trained": res.tokens, "completions_sampled": completions,
              "tokens_sampled": round(tokens_sampled), "reward_model_calls": completions * _reward_models(cfg)}
    budget.update(flops(n_total, n_trainable, res.tokens, tokens_sampled, uses_frozen_forward(cfg)))
    budget.update(usage.snapshot())
    return budget


def _local_rows(data, limit: int | None) -> int | None:
    """The rows of data.train (all its files together: a weighted mixture has as many), None when unknown."""
    paths = [s.path for s in data.train_sources()]
    if not paths or not all(Path(p).is_file() for p in paths):
        return None
    from ..data.sources import load_records

    try:
        return sum(len(load_records(p, limit=limit)) for p in paths)
    except Exception:  # the run's own validation reports a bad file; a budget estimate must not
        return None


def configured(cfg, with_flops: bool = True) -> dict:
    """The budget a single-stage config asks for (module docstring), before running (a pipeline: `add` its
    stages' budgets). `with_flops=False` leaves the FLOPs None: counting the parameters resolves the model (an
    alias's GGUF is converted once), which a study that matches no FLOPs need not wait for."""
    t, rl = cfg.train, cfg.rl
    mode = _rollout_mode(cfg)
    micro = t.batch_size
    steps = t.max_steps
    if mode:
        per_group = {"pairs": 1, "best_of_n": 1 if mode == "best_of_n" and _keep(cfg) == "best" else rl.group_size}
        units = rl.prompts_per_step * per_group.get(mode, rl.group_size)  # the most rows a round yields
        per_epoch = rl.ppo_epochs * math.ceil(units / micro)  # micro-batches per rollout round
    else:
        n = _local_rows(cfg.data, cfg.data.limit)
        if n is not None and not cfg.data.eval:
            n -= min(cfg.data.eval_max, int(round(n * cfg.data.eval_fraction)))
        per_epoch = math.ceil(n / micro) if n is not None and not cfg.data.packing else None
    if not steps:
        steps = max(1, math.ceil(t.epochs * per_epoch / t.grad_accum)) if per_epoch else None
    rounds = math.ceil(steps * t.grad_accum / per_epoch) if mode and steps else 0
    completions = rounds * rl.prompts_per_step * rl.group_size if mode else 0
    budget = {"steps": steps, "sequences_trained": steps * micro * t.grad_accum if steps else None,
              "tokens_trained": steps * micro * t.grad_accum * cfg.data.max_length if steps else None,  # upper bound
              "completions_sampled": completions, "tokens_sampled": completions * rl.max_new_tokens if mode else 0,
              "reward_model_calls": completions * _reward_models(cfg)}
    counts = parameter_counts(cfg) if with_flops else (None, None)
    budget.update(flops(*counts, budget["tokens_trained"], budget["tokens_sampled"], uses_frozen_forward(cfg)))
    return budget


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
    sources = cfg.data.train_sources()
    train = [("data.train", s.path) for s in sources] if len(sources) == 1 else \
        [(f"data.train[{i}]", s.path) for i, s in enumerate(sources)]
    for key, path in [("config.yaml", Path(out) / "config.yaml"), *train, ("data.eval", cfg.data.eval)]:
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

"""THE run orchestrator: one single-stage run, end to end, for every objective.

    config → prepare (model, template, data kind, method; nothing written) → run dir → reference (if the
    objective needs one) → objective → measure before (+ samples, base tasks) → batch source → THE loop
    (`loop.fit`) → measure after (+ samples, final tasks) → artifacts → results.json

What differs per objective lives on the objective (`objectives.base.RunHooks`: its data kind, whether it needs a
reference, whether it generates text, what it measures, what it saves beside the adapter); nothing here
branches on the objective's or the method's name. Multi-stage configs are dispatched above this module
(`train/launch.py` → `train/pipeline.py`).

The run directory:

    config.yaml        the resolved config
    metrics.jsonl      training and evaluation rows (eval rows: the objective's held-out measures + tasks)
    samples.jsonl      generations at each evaluation (``samples.at_eval``)
    checkpoints/       atomic, last K kept — a rerun with the same output_dir resumes from the latest
    adapter/ | model/  the trained artifact + tokenizer with the run's chat template
    results.json       measures before/after, samples, parameter counts, timings, data statistics, tasks
    .tunelab.lock      held while the run runs (`rundir`: a second run into the folder is refused)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import RunConfig, save_config
from ..data.batches import RunContext
from ..data.kinds import data_kind
from ..errors import TunelabError
from ..jsonl import read_rows
from ..objectives import build_objective, objective_class
from ..objectives.reference import build_reference
from .artifacts import generate_samples, pair_samples, save_artifacts, write_results
from .checkpoint import latest_checkpoint
from .guards import disk_full, is_disk_full
from .log import console
from .loop import fit, total_steps
from .prepare import RunInputs, prepare
from .rundir import check_output_dir, claim_run_dir
from .task_eval import evaluate_base, evaluate_during, evaluate_final


def _samples(p: RunInputs, cfg: RunConfig) -> list[dict]:
    return generate_samples(p.model, p.tokenizer, p.template, p.eval_prompts, cfg)


def run(cfg: RunConfig, stop_after: int | None = None) -> Path:
    """Run single-stage `cfg` to completion (or to `stop_after` steps, for tests); returns the run directory."""
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    check_output_dir(out, cfg.overwrite)  # fail fast, before minutes of loading
    kind = data_kind(objective_class(cfg.objective).data_kind)
    p = prepare(cfg)  # every check user input can fail; nothing written yet
    console.print(p.report.summary())
    console.print(kind.summary(p.stats, len(p.eval)))
    torch.manual_seed(cfg.train.seed)
    # created, locked against a second run, the previous run cleared (overwrite / resume=false) — only now; a user
    # error found once the run started (a reward function that raises on real completions) removes a folder this
    # call created unless it holds a checkpoint
    with claim_run_dir(out, cfg.overwrite, cfg.resume):
        try:
            return _run(cfg, p, kind, out, t0, stop_after)
        except Exception as e:  # any other write that hit a full disk (samples, config, cached log-probs)
            if isinstance(e, TunelabError) or not is_disk_full(e):
                raise
            name = getattr(e, "filename", None)  # OSError names the file; safetensors' error does not
            raise (disk_full(Path(name).name, Path(name).parent) if name else disk_full("run files", out)) from None


def _run(cfg: RunConfig, p: RunInputs, kind, out: Path, t0: float, stop_after: int | None) -> Path:
    save_config(cfg, out / "config.yaml")
    read_rows(out / "samples.jsonl", repair=True)  # a row torn by a kill: cut, so the next one starts a line
    pad = p.tokenizer.pad_token_id
    reference = build_reference(cfg, p.model, {"train": p.train, "eval": p.eval}, pad, out)
    objective = build_objective(cfg, reference)
    resuming = cfg.resume and latest_checkpoint(out / "checkpoints") is not None
    batches = kind.batches(p.train, cfg, pad, RunContext(p.model, p.tokenizer, p.template, objective, out))
    total = total_steps(cfg.train, batches.per_epoch)
    # what the run measures: the objective's own, or — for a source that generates its batches (rollouts) —
    # the source's (held-out rewards need its sampler and reward functions)
    measures = batches if hasattr(batches, "measure") else objective

    # before training: the measures, sample generations, the base model on the eval tasks
    before = measures.measure(p.model, p.train, p.eval, pad, cfg)
    console.print(f"before: {measures.describe(before)}")
    samples_before = [] if resuming else _samples(p, cfg)
    base_tasks = evaluate_base(cfg, p.model, p.tokenizer, p.template) if objective.generator else None
    torch.manual_seed(cfg.train.seed)  # evaluation may sample; training randomness must not depend on it

    def evaluate(step: int) -> dict:
        row = {**measures.measure_during(p.model, p.eval, pad, cfg),
               **(evaluate_during(cfg, p.model, p.tokenizer, p.template) if objective.generator else {})}
        if cfg.samples.at_eval and step < total:  # the final samples go to results.json
            with (out / "samples.jsonl").open("a") as f:
                for s in _samples(p, cfg):
                    f.write(json.dumps({"step": step, **s}) + "\n")
        return row

    res = fit(p.model, objective, batches, cfg.train, out, evaluate=evaluate, resume=cfg.resume,
              stop_after=stop_after)
    if stop_after is not None and res.steps < total:
        return out

    # after training: the same measures, samples and tasks; then the artifacts
    after = measures.measure(p.model, p.train, p.eval, pad, cfg)
    console.print(f"after:  {measures.describe(after)}")
    samples_after = _samples(p, cfg)
    task_fields = evaluate_final(cfg, p.model, p.tokenizer, p.template, base_tasks)
    with objective.saving(p.model, out):  # e.g. a reward model's head goes to its own file
        save_artifacts(p.model, p.tokenizer, p.template, cfg, out)
    results = {"method": cfg.method, "objective": cfg.objective, "report": p.report.summary(),
               "trainable_params": p.report.trainable, "total_params": p.report.total, "data": p.stats,
               **measures.result_fields(before, after), **objective.extra_results(p.model, p.eval, pad),
               "steps": res.steps, "train_tokens": res.tokens, "train_seconds": res.seconds,
               "tokens_per_s": res.tokens / max(res.seconds, 1e-9), "final_train_loss": res.last_loss,
               "total_seconds": time.perf_counter() - t0,
               "samples": pair_samples(samples_before, samples_after), **task_fields}
    write_results(out, results)
    console.print(f"{cfg.objective}: {res.steps} steps, {results['tokens_per_s']:,.0f} tokens/s, "
                  f"{res.seconds:.0f}s → {out}")
    return out

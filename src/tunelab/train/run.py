"""THE run orchestrator: one single-stage run, end to end, for every objective.

    config → prepare (model, template, data kind, method; nothing written) → run dir → reference (if the
    objective needs one) → objective → measure before (+ samples, base tasks) → batch source → THE loop
    (`loop.fit`) → measure after (+ samples, final tasks) → artifacts → results.json

What differs per objective lives on the objective (`objectives.base.RunHooks`: its data kind, whether it needs a
reference, whether it generates text, what it measures, what it saves beside the adapter); nothing here
branches on the objective's or the method's name. Multi-stage configs are dispatched above this module
(`train/launch.py` → `train/pipeline.py`).

Under torchrun (`train/distributed.py`) every rank runs this same function: the model is wrapped (DDP) or
sharded (FSDP2) after the reference is built, measures and generations run on every rank on the gathered
weights, and only rank 0 writes the run directory — so a distributed run's folder has the same files, in the
same formats, as a single-process run's (its checkpoints excepted: sharded, `train/dist_checkpoint.py`).

The run directory:

    config.yaml        the resolved config
    metrics.jsonl      training and evaluation rows (eval rows: the objective's held-out measures + tasks)
    samples.jsonl      generations at each evaluation (``samples.at_eval``)
    checkpoints/       atomic, last K kept — a rerun with the same output_dir resumes from the latest (a finished
                       run rerun with a larger train.max_steps continues: train/continuation.py)
    adapter/ | model/  the trained artifact + tokenizer with the run's chat template
    results.json       measures before/after, samples, parameter counts, timings, data statistics, tasks
    .tunelab.lock      held while the run runs (`rundir`: a second run into the folder is refused)
    .tunelab-run       the marker: this folder is a tunelab run (id, kind, version); only a marked folder is ever
                       cleared or resumed (`rundir`)
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable

import torch

from ..adapters.base import saves_full_model
from ..config import RunConfig, save_config
from ..console import plural
from ..data.batches import RunContext
from ..data.kinds import data_kind
from ..errors import TunelabError
from ..jsonl import read_rows
from ..objectives import build_objective, objective_class
from ..objectives.reference import build_reference
from . import accounting, continuation, dist_checkpoint
from .artifacts import generate_samples, pair_samples, save_artifacts, write_results
from .distributed import Engine, barrier, check_supported, is_main, main_says, plan, world_size
from .guards import disk_full, is_disk_full
from .log import console, phase
from .loop import fit, total_steps
from .prepare import RunInputs, prepare
from .rundir import check_output_dir, claim_run_dir
from .task_eval import evaluate_base, evaluate_during, evaluate_final


def _samples(p: RunInputs, cfg: RunConfig, when: str) -> list[dict]:
    if not p.eval_prompts:
        return []
    with phase(f"generating {plural(len(p.eval_prompts), 'sample')} {when}"):
        return generate_samples(p.model, p.tokenizer, p.template, p.eval_prompts, cfg)


def run(cfg: RunConfig, stop_after: int | None = None) -> Path:
    """Run single-stage `cfg` to completion (or to `stop_after` steps, for tests); returns the run directory."""
    t0 = time.perf_counter()
    usage = accounting.Usage.start()  # budget: this run's wall/CPU seconds and peak memory
    out = Path(cfg.output_dir)
    # fail fast, before minutes of loading: the folder, and where the run starts (train/continuation.py)
    finished = continuation.extending(cfg)
    check_output_dir(out, cfg.overwrite, extending=finished is not None)
    if finished is None:
        continuation.check_own_checkpoint(cfg)  # the checkpoint a rerun resumes from must fit this config
    start_from = continuation.checkpoint_source(cfg)
    kind = data_kind(objective_class(cfg.objective).data_kind)
    p = prepare(cfg)  # every check user input can fail; nothing written yet
    console.print(p.report.summary())
    console.print(kind.summary(p.stats, len(p.eval)))
    torch.manual_seed(cfg.train.seed)
    # created, locked against a second run, the previous run cleared (overwrite / resume=false) — only now; a user
    # error found once the run started (a reward function that raises on real completions) removes a folder this
    # call created unless it holds a checkpoint. Under torchrun rank 0 alone claims the folder (and holds its
    # lock); the other ranks wait until it exists, then only rank 0 writes into it (checkpoint shards excepted)
    if finished is not None:
        console.print(f"continuing finished run from step {finished} to {cfg.train.max_steps}")
    with claim_on_main(out, cfg.overwrite, cfg.resume, extending=finished is not None):
        try:
            return _run(cfg, p, kind, out, t0, stop_after, usage, start_from)
        except Exception as e:  # any other write that hit a full disk (samples, config, cached log-probs)
            if isinstance(e, TunelabError) or not is_disk_full(e):
                raise
            name = getattr(e, "filename", None)  # OSError names the file; safetensors' error does not
            raise (disk_full(Path(name).name, Path(name).parent) if name else disk_full("run files", out)) from None


@contextmanager
def claim_on_main(out: Path, overwrite: bool, resume: bool, checks: Callable[[], None] | None = None,
                  kind: str = "run", extending: bool = False):
    """`claim_run_dir` (after `checks()`, if given) by rank 0 alone under torchrun: the others wait until the folder
    exists, is locked and cleared. Rank 0's success is broadcast, so when it cannot claim the folder (in use by
    another run, …) every rank stops with a user error — none is left waiting at a barrier (which, under `tunelab
    compare`, would pair with a later one). Without torchrun: `claim_run_dir` itself."""
    if world_size() == 1:
        if checks:
            checks()
        with claim_run_dir(out, overwrite, resume, kind, extending) as created:
            yield created
        return
    barrier()  # every rank has checked the folder (a probe of its lock) before rank 0 takes the lock
    if not is_main():
        if not main_says(0):
            time.sleep(1.0)  # rank 0 reports its own error first: it says what is wrong with the folder
            raise TunelabError(f"output_dir {out}: rank 0 could not claim it")
        barrier()  # the folder exists, is locked and cleared
        yield False
        return
    with ExitStack() as stack:
        try:
            if checks:
                checks()
            created = stack.enter_context(claim_run_dir(out, overwrite, resume, kind, extending))
        except BaseException:
            main_says(0)
            raise
        main_says(1)
        barrier()
        yield created


def _run(cfg: RunConfig, p: RunInputs, kind, out: Path, t0: float, stop_after: int | None,
         usage: accounting.Usage, start_from: Path | None = None) -> Path:
    main = is_main()
    if main:
        save_config(cfg, out / "config.yaml")
        read_rows(out / "samples.jsonl", repair=True)  # a row torn by a kill: cut, so the next one starts a line
    pad = p.tokenizer.pad_token_id
    check_supported(cfg, plan(cfg.parallel, p.model))
    # the reference first: a frozen copy is taken of the plain model, then the policy is wrapped / sharded
    reference = build_reference(cfg, p.model, {"train": p.train, "eval": p.eval}, pad, out)
    engine = Engine(p.model, cfg.parallel)
    objective = build_objective(cfg, reference)
    resuming = (cfg.resume and dist_checkpoint.latest(out / "checkpoints", engine) is not None) or bool(start_from)
    ctx = RunContext(p.model, p.tokenizer, p.template, objective, out, engine.rank, engine.world, engine.gathered)
    batches = kind.batches(p.train, cfg, pad, ctx)
    total = total_steps(cfg.train, batches.per_epoch)
    # what the run measures: the objective's own, or — for a source that generates its batches (rollouts) —
    # the source's (held-out rewards need its sampler and reward functions)
    measures = batches if hasattr(batches, "measure") else objective

    # before training: the measures, sample generations, the base model on the eval tasks (every rank computes
    # them on the gathered weights; rank 0 writes)
    with engine.gathered():
        with phase("measuring the model before training"):
            before = measures.measure(p.model, p.train, p.eval, pad, cfg)
        console.print(f"before: {measures.describe(before)}")
        samples_before = [] if resuming else _samples(p, cfg, "before training")
        base_tasks = evaluate_base(cfg, p.model, p.tokenizer, p.template) if objective.generator else None
    torch.manual_seed(cfg.train.seed)  # evaluation may sample; training randomness must not depend on it

    def evaluate(step: int) -> dict:
        with engine.gathered():
            with phase(f"evaluating at step {step}"):
                row = {**measures.measure_during(p.model, p.eval, pad, cfg),
                       **(evaluate_during(cfg, p.model, p.tokenizer, p.template) if objective.generator else {})}
            samples = _samples(p, cfg, f"at step {step}") if cfg.samples.at_eval and step < total else []
        if main and samples:
            with (out / "samples.jsonl").open("a") as f:
                for s in samples:
                    f.write(json.dumps({"step": step, **s}) + "\n")
        return row

    res = fit(p.model, objective, batches, cfg.train, out, evaluate=evaluate, resume=cfg.resume,
              stop_after=stop_after, engine=engine, start_from=start_from, usage=usage)  # totals ride on checkpoints
    close = getattr(batches, "close", lambda: None)  # a rollout engine (rl.sampler: vllm) lets its memory go
    if stop_after is not None and res.steps < total:
        close()
        return out

    # after training: the same measures, samples and tasks; then the artifacts (rank 0, same formats)
    full = engine.full_state_dict() if saves_full_model(cfg.method) else None
    with engine.gathered():
        with phase("measuring the model after training"):
            after = measures.measure(p.model, p.train, p.eval, pad, cfg)
        close()  # after the held-out measure, which samples through the run's own sampler
        console.print(f"after:  {measures.describe(after)}")
        samples_after = _samples(p, cfg, "after training")
        task_fields = evaluate_final(cfg, p.model, p.tokenizer, p.template, base_tasks)
        extra = objective.extra_results(p.model, p.eval, pad)
        if main:
            what = "model" if saves_full_model(cfg.method) else "adapter"
            with objective.saving(p.model, out), phase(f"saving the trained {what}"):
                save_artifacts(p.model, p.tokenizer, p.template, cfg, out, state_dict=full)
    sampled = accounting.sampled_totals(batches, engine)  # every rank's rollouts (a collective: before the return)
    barrier()
    if not main:
        return out
    budget = accounting.consumed(cfg, res, usage, out, p.report.total, p.report.trainable, engine.world, sampled)
    results = {"method": cfg.method, "objective": cfg.objective, "report": p.report.summary(),
               "trainable_params": p.report.trainable, "total_params": p.report.total, "data": p.stats,
               **measures.result_fields(before, after), **extra,
               "steps": res.steps, "train_tokens": res.tokens, "train_seconds": res.seconds,
               "tokens_per_s": res.tokens / max(res.seconds, 1e-9), "final_train_loss": res.last_loss,
               "compute_dtype": res.compute_dtype,  # train.compute_dtype as resolved (auto: what it picked)
               "total_seconds": budget["wall_seconds"],  # every invocation's, as train_seconds (a resumed run)
               "samples": pair_samples(samples_before, samples_after), **task_fields,
               # what the run consumed and where it ran (train/accounting.py)
               "budget": budget,
               "provenance": accounting.run_provenance(cfg, out)}
    write_results(out, results)
    console.print(f"{cfg.objective}: {plural(res.steps, 'step')}, {results['tokens_per_s']:,.0f} tokens/s, "
                  f"{res.seconds:.0f}s → {out}")
    return out

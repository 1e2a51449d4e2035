"""THE training loop — one loop for every objective (SFT, preference, online RL: the batch source differs).

Per optimizer step:
  1. take `grad_accum` micro-batches from the batch source (`data.batches`: a static dataset or, for online
     RL, rollouts — the loop does not know which);
  2. for each, `loss_sum, n, metrics = objective.loss(model, batch)` and backpropagate the *unnormalised* sum;
  3. divide all gradients by N = Σ n (tokens or pairs) of the accumulated micro-batches — the gradient of
     the mean over every unit, identical to one big batch (not a mean of per-micro-batch means);
  4. clip the global gradient norm, optimizer step, scheduler step, then the objective's `on_step` hook (a
     moving reference syncs here). A step whose micro-batches hold no loss unit at all (N = 0: PPO's approx-KL
     early stop skipping the rest of a round, a rejection-sampling step whose rows were all rejected) skips the
     optimizer step — with zero gradients AdamW would still move the weights (momentum, weight decay) — as
     Stable-Baselines3 breaks out of the epoch; the scheduler and the step counter still advance;
  5. log, evaluate every `eval_every`, checkpoint atomically every `save_every` and at the last step (with the
     objective's state; the last one lets a larger `train.max_steps` extend the finished run, train/continuation.py).
     A Ctrl-C is honoured here, at the end of a whole step: a checkpoint at this step, then one line (interrupt.py;
     under torchrun every rank stops at the same step, agreed by one all-reduce).

Distributed (`train/distributed.py`, under torchrun): the `Engine` runs each loss as the DDP/FSDP2 wrapper's
forward, reduces gradients on the last micro-batch only, and Σn, the logged loss and the token count are summed
over ranks, so N ranks × micro-batch b reproduce one process with batch N·b; metrics are averaged over ranks.

Divergence (`train.divergence`, rule in `guards.py`) is judged between 3 and 4, before the optimizer moves:
a non-finite loss or gradient (any objective), or an NLL loss collapsing to ln(vocab), stops the run with
one `TunelabError` line. The checkpoint of the weights that produced the bad loss (saved right after the
previous step) is deleted, so the newest checkpoint left is the last good one, and nothing is exported.
Under torchrun the guard judges the all-reduced loss and the global gradient norm, so every rank sees the
same numbers; the ranks' verdicts are combined once more before anyone stops (all stop together, none is
left waiting in a collective), and only rank 0 deletes checkpoint folders (that one, and pruning).

Memory mode (`train.memory_mode`): each micro-batch of an objective whose loss is a sum over rows
(`rows_additive`: SFT) runs one row at a time, trimmed to that row's length, and every decoder layer's MLP is
recomputed in the backward pass (`models.checkpointing`). Step 3 makes the result the same gradient (tested);
peak activation memory becomes one row's, linear in its length.

Precision and fusion (both undone when the loop ends): `train.compute_dtype` (models/precision.py) picks the
autocast dtype the forward runs in over fp32 weights; `train.fuse_projections` (adapters/fused.py) runs the frozen
q,k,v and gate,up projections of LoRA/DoRA/QLoRA layers as one GEMM each, unfused again before anything is saved.

Determinism: a static source's batch order is a pure function of (seed, epoch), and a source with state
(`state_dict`/`load_state_dict`) has it saved in every checkpoint beside the objective's; dropout draws from the torch RNG that each
checkpoint saves and restores, so a resumed CPU run reproduces the uninterrupted loss curve exactly.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..adapters.fused import fuse_projections
from ..data.batches import BatchSource, split_rows
from ..errors import TunelabError
from ..models.checkpointing import checkpoint_layers
from ..models.compiling import compile_layers
from ..models.modes import training_autocast
from ..models.precision import resolve_compute_dtype, set_compute_dtype
from . import dist_checkpoint
from .checkpoint import complete_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from .distributed import Engine
from .guards import DivergenceGuard
from .interrupt import StopRequest, TrainingInterrupted, kept_line
from .log import MetricsLog, TrainDisplay, console
from .optim import build_optimizer, build_scheduler


@dataclass
class LoopResult:
    steps: int
    tokens: int
    seconds: float  # training time, periodic evaluations excluded
    last_loss: float
    resumed_from: int | None
    compute_dtype: str = "float32"  # what the forward computed in (train.compute_dtype resolved: auto's pick)


def total_steps(cfg, per_epoch: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _position(loop: dict, cfg, engine: Engine) -> int:
    """The saved micro-batch counter in this run's units: a global micro-batch holds world · batch_size rows,
    so resuming at another world size (the same global batch) rescales it."""
    saved = loop.get("rows_per_micro", engine.world * cfg.batch_size)
    rows = loop["micro"] * saved
    now = engine.world * cfg.batch_size
    if rows % now:
        raise TunelabError(f"this checkpoint was taken after {rows} rows; with {engine.world} rank(s) × "
                           f"train.batch_size={cfg.batch_size} that is not a whole number of micro-batches — "
                           "resume with the same global batch (ranks × batch_size × grad_accum)")
    return rows // now


def batch_tokens(batch: dict) -> int:
    """The real tokens of a micro-batch, for throughput and the run's token count: a packed row's padding has
    `seq_ids` −1 (pad ids are real ids — eos for SmolLM2 — so the ids cannot tell), an unpacked row's has
    attention_mask 0; a 4-D (block) attention mask says nothing per token, so every position counts."""
    if "seq_ids" in batch:
        return int((batch["seq_ids"] >= 0).sum())
    if batch["attention_mask"].dim() == 2:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def _vocab_size(model) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _diverged(ckpt_dir: Path, step: int, diagnosis: str, lr: float, engine: Engine):
    """Stop: drop the checkpoint of the weights that gave the bad loss (those after `step`), name the rest.
    Under torchrun every rank comes here together; rank 0 deletes, the others wait for it before they stop."""
    bad = ckpt_dir / f"step-{step:06d}"
    if engine.rank == 0 and bad.exists():
        shutil.rmtree(bad)
    engine.max_int(0)  # a barrier: no rank ends (and gets the launch torn down) before the deletion is done
    good = complete_checkpoints(ckpt_dir)
    kept = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was kept"
    raise TunelabError(f"training diverged at step {step + 1}: {diagnosis} (train.lr {lr:g}); {kept}; "
                       "nothing was exported — lower train.lr (or set train.divergence.enabled=false)")


def follow_schedule(optimizer, scheduler, lr: float, step: int) -> None:
    """Set the learning rate of a restored optimizer to this run's schedule at `step`: base `lr` × the schedule's
    factor for this run's total steps. A plain resume gets the value the checkpoint held (the same schedule);
    a run extended to a larger `train.max_steps` continues on the schedule recomputed for the new total (cosine:
    the rate rises again from where the new curve is at `step`) rather than on the old one's end value."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _interrupted(save: Callable[[int], Path], saved: bool, step: int, total: int, ckpt_dir: Path):
    """Stop after a Ctrl-C: a checkpoint at `step` (unless this step's periodic one was just written), one line."""
    if not saved:
        try:
            save(step)
        except TunelabError as e:  # not safely savable (NaN weights, a full disk): the previous one is kept
            raise TrainingInterrupted(f"interrupted at step {step}/{total}: no checkpoint at this step ({e}); "
                                      f"{kept_line(ckpt_dir)}") from None
    raise TrainingInterrupted(f"interrupted at step {step}/{total}: {kept_line(ckpt_dir)}")


def fit(model, objective, stream: BatchSource, cfg, run_dir: Path, *,
        evaluate: Callable[[int], dict] | None = None, resume: bool = True,
        stop_after: int | None = None, engine: Engine | None = None, start_from: Path | None = None,
        usage=None) -> LoopResult:
    """Train `model` with `objective` on `stream` under TrainConfig `cfg`; writes logs and checkpoints.
    `engine`: how this process takes part (DDP/FSDP2 under torchrun); default: a plain single process.
    `start_from`: a checkpoint folder to continue from when `run_dir` has none of its own (`train.resume_from`).
    `usage` (`train.accounting.Usage`): the run's resource totals, stored in every checkpoint (``snapshot()``) and
    restored on resume (``restore()``), so a resumed or extended run's budget counts every invocation."""
    engine = engine or Engine(model)
    main = engine.rank == 0
    device = next(model.parameters()).device
    total = total_steps(cfg, stream.per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total))
    optimizer = build_optimizer(model.named_parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total, warmup, cfg.min_lr_ratio)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    split = cfg.memory_mode and getattr(objective, "rows_additive", False)
    if cfg.fuse_projections and engine.distributed:
        raise TunelabError("train.fuse_projections: not supported under torchrun (DDP/FSDP2 shard the weights it "
                           "fuses); set it to false")
    # what the loop changes on the model is undone however the loop ends — a divergence or a user error raises
    # out of it — last in, first out: the compiled layers go before the checkpointed MLP they call
    undo = contextlib.ExitStack()
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device, memory_mode=cfg.memory_mode)
    undo.callback(set_compute_dtype(model, compute_dtype))
    if cfg.memory_mode:
        undo.callback(checkpoint_layers(model, "mlp"))
    if cfg.fuse_projections:  # weights become views of one fused tensor until the loop ends: unfused before saving
        undo.callback(fuse_projections(model)[1])
    if cfg.compile:  # after: a compiled layer calls the checkpointed MLP
        undo.callback(compile_layers(model))

    with undo:
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir = run_dir / "checkpoints"
        step, micro, tokens, resumed = 0, 0, 0, None
        trained_before = 0.0  # training seconds of earlier invocations (a resumed run's throughput spans them all)
        latest = dist_checkpoint.latest(ckpt_dir, engine) if resume else None  # verified (rank 0), damaged moved aside
        latest = latest if latest is not None else start_from
        if latest is not None:
            if engine.distributed or dist_checkpoint.is_sharded(latest):
                state = dist_checkpoint.load(latest, model, optimizer, scheduler, objective, engine)
            else:
                state = load_checkpoint(latest, model, optimizer, scheduler, objective)
            step, micro, tokens = state["step"], _position(state["loop"], cfg, engine), state["loop"]["tokens"]
            trained_before = state["loop"].get("train_seconds", 0.0)
            if usage is not None:
                usage.restore(state["loop"].get("usage"))
            if hasattr(stream, "load_state_dict"):
                stream.load_state_dict(state["loop"].get("source", {}))
            resumed = step
            if step > total:
                raise TunelabError(f"{latest} was taken at step {step}, past train.max_steps={total}; raise "
                                   "train.max_steps, or pass overwrite=true to start over")
            follow_schedule(optimizer, scheduler, cfg.lr, step)
            console.print(f"resumed from {latest} (step {step})")
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=resumed if resume else None,
                         trackers=cfg.trackers, run_dir=run_dir, redo_eval=resumed == total) if main else None
        autocast = training_autocast(model)  # train.compute_dtype's autocast (online RL's π_old forward uses it too)

        model.train()
        prune_due = False  # checkpoints beyond keep_last go once the newest one's weights gave a healthy loss
        guard = DivergenceGuard(cfg.divergence, _vocab_size(model), getattr(objective, "nll_loss", False))
        on_step = getattr(objective, "on_step", None)
        last_loss = float("nan")
        eval_seconds = 0.0  # kept out of the training throughput
        t_start = time.perf_counter()

        def save(step: int) -> Path:
            loop_state = {"micro": micro, "tokens": tokens, "rows_per_micro": engine.world * cfg.batch_size,
                          "train_seconds": trained_before + time.perf_counter() - t_start - eval_seconds,
                          **({"usage": usage.snapshot()} if usage is not None else {}),
                          **({"source": stream.state_dict()} if hasattr(stream, "state_dict") else {})}
            obj_state = objective.state_dict() if hasattr(objective, "state_dict") else None
            if engine.distributed:  # sharded; rank 0 writes the manifest and renames it into place
                return dist_checkpoint.save(ckpt_dir, step, model, optimizer, scheduler, loop_state, obj_state, engine)
            return save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, loop_state, None, obj_state)

        # under torchrun too: every rank's own SIGINT (sent on by the agent) only sets its flag; rank 0 says so
        stop = StopRequest(ckpt_dir, total, step, announce=main, torchrun=engine.distributed)
        with TrainDisplay(total, step, cfg.log_every) as bar, stop:
            while step < total:
                if stop_after is not None and step >= stop_after:
                    break
                t0 = time.perf_counter()
                loss_sum, n_sum, step_tokens, metrics = 0.0, 0, 0, {}
                for i in range(cfg.grad_accum):
                    epoch, index = divmod(micro, stream.per_epoch)
                    batch = _to(stream.get(epoch, index), device)
                    micro += 1
                    source_metrics = batch.pop("source_metrics", None) or {}  # e.g. a rollout round's rewards
                    filler = batch.pop("zero_weight", False)  # a rank's empty share of a short last batch
                    parts = split_rows(batch) if split else [batch]  # memory mode: row by row
                    m = dict(source_metrics)
                    for j, part in enumerate(parts):
                        # reduce gradients on the step's last backward only
                        with engine.sync(last=i == cfg.grad_accum - 1 and j == len(parts) - 1):
                            with autocast:
                                ls, n, part_m = engine.forward(objective.loss, part)
                            if filler:
                                ls, n = ls * 0.0, 0
                            ls.backward()
                        loss_sum += float(ls.detach())
                        n_sum += int(n)
                        for k, v in part_m.items():
                            m[k] = m.get(k, 0.0) + v / len(parts)
                    step_tokens += 0 if filler else batch_tokens(batch)
                    for k, v in m.items():
                        metrics[k] = metrics.get(k, 0.0) + v / cfg.grad_accum
                if engine.distributed:  # every rank's units, loss and tokens; DDP/FSDP2 averaged the gradients
                    loss_sum, n_sum, step_tokens = engine.all_sum(loss_sum, n_sum, step_tokens)
                    n_sum, step_tokens = int(n_sum), int(step_tokens)
                    metrics = engine.mean_metrics(metrics)
                denom = max(n_sum, 1)
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(denom / engine.grad_world)
                if engine.distributed:
                    gnorm = engine.clip(params, cfg.max_grad_norm)
                else:
                    gnorm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm
                             else torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
                lr = scheduler.get_last_lr()[0]
                # the all-reduced loss and the global norm: the same on all ranks
                diagnosis = guard.check(loss_sum / denom, float(gnorm))
                if engine.distributed:  # and should a rank still disagree, every rank stops with it: none hangs alone
                    stopper = engine.max_int(engine.rank + 1 if diagnosis else 0)
                    if stopper and not diagnosis:
                        diagnosis = f"rank {stopper - 1} diagnosed a divergence"
                if diagnosis:
                    _diverged(ckpt_dir, step, diagnosis, cfg.lr, engine)
                if prune_due:  # the newest checkpoint's weights just gave a healthy loss: older ones may go
                    if main:
                        prune_checkpoints(ckpt_dir, cfg.keep_last)
                    prune_due = False
                if n_sum > 0:  # no loss unit in the whole step (PPO's approx-KL early stop, every row rejected): no
                    optimizer.step()  # step at all — AdamW's momentum and weight decay would move the weights anyway
                with warnings.catch_warnings():  # a skipped first step makes torch warn about the order: intended
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                stop.step = step
                if on_step is not None:
                    on_step(step)
                tokens += step_tokens
                dt = time.perf_counter() - t0
                last_loss = loss_sum / denom
                if main and (step % cfg.log_every == 0 or step == total):
                    log.write({"step": step, "loss": last_loss, "lr": lr, "tokens_per_s": step_tokens / dt,
                               "step_seconds": dt, "grad_norm": float(gnorm), "tokens": tokens,
                               "epoch": micro / stream.per_epoch,
                               "n_loss_units": n_sum, **metrics})
                if main:
                    bar.step(step, last_loss, lr, step_tokens / dt, dt, metrics)
                if evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                    t_eval = time.perf_counter()
                    row = evaluate(step)
                    if row and main:  # an objective with nothing held out and no tasks measures nothing
                        log.write({"step": step, **row})
                    model.train()
                    eval_seconds += time.perf_counter() - t_eval
                # the last step too: a finished run can be extended (a larger train.max_steps) from its final state
                saved = cfg.save_every and (step % cfg.save_every == 0 or step == total)
                if saved:
                    save(step)
                    prune_due = True
                # Ctrl-C during this step: keep its state, then stop (train/interrupt.py); under torchrun the
                # ranks agree first (one all-reduce), so all of them stop at this same step and save together
                if stop.agreed(engine.max_int if engine.distributed else None):
                    _interrupted(save, saved, step, total, ckpt_dir)
        if prune_due and main:
            prune_checkpoints(ckpt_dir, cfg.keep_last)
    if evaluate and step == total:
        row = evaluate(step)
        if row and main:
            log.write({"step": step, **row})
    if log is not None:  # rank 0 only under torchrun
        log.close()
    seconds = trained_before + time.perf_counter() - t_start - eval_seconds
    return LoopResult(step, tokens, seconds, last_loss, resumed,
                      str(compute_dtype or next(model.parameters()).dtype).removeprefix("torch."))

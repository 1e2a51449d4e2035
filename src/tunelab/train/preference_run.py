"""One preference run (objective dpo, simpo, orpo, kto or reward): SFT's orchestration (run.py) with pair data.

config → records → pairs (kto: unpaired examples) → model + adapter (+ reward head) → reference (dpo/kto only;
reference-free objectives never build one) → objective → THE loop (`loop.fit`) → artifacts.

Batches hold `train.batch_size` pairs (2·batch_size sequences in one forward; kto: batch_size completions plus
their KL partners), reshuffled per epoch from (seed, epoch); no packing (each row must be one sequence).
The loss masks the prompt whatever `data.masking` says only when it is the default: asking for another mode is
an error, since a preference loss compares log π(response | prompt).

The run directory is run.py's, plus ``reference_logps.safetensors`` (with ``reference.precompute``) and, for a
reward model, ``reward_head.safetensors``. results.json carries the objective's metrics before and after
training on held-out pairs (``eval``) and on the first ``pref.probe`` training pairs (``train``, default 64),
including the policy's own preference (``logp_margin``/``logp_accuracy``), informative before training too.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..config import RunConfig, save_config
from ..data.preference import (collate_pairs, collate_unpaired, encode_pairs, encode_unpaired, to_pair,
                               to_unpaired)
from ..data.sources import load_records
from ..data.templates import get_template
from ..errors import TunelabError
from ..models.load import load_model
from ..objectives import build_objective, needs_reference
from ..objectives.pairwise import evaluate_pairs
from .checkpoint import latest_checkpoint
from .log import console
from .task_eval import check_tasks, evaluate_base, evaluate_final
from .loop import BatchStream, fit, total_steps
from .run import (Prepared, _apply_method, _pair_samples, _samples, _split, _start_run_dir, save_artifacts,
                  with_method)

def _check(cfg: RunConfig) -> None:
    if not cfg.data.train:
        raise TunelabError("data.train: no training data given (a .jsonl/.json/.csv/.parquet file or a dataset name)")
    if cfg.data.masking != "prompt":
        raise TunelabError(f"data.masking={cfg.data.masking}: preference objectives score only the response "
                           "(use prompt)")
    want = "unpaired" if cfg.objective == "kto" else "preference"
    if cfg.data.format not in ("auto", want):
        raise TunelabError(f"data.format={cfg.data.format}: objective {cfg.objective} needs {want} data")
    r = cfg.reference
    if r.precompute and r.sync_every:
        raise TunelabError("reference.precompute cannot be combined with reference.sync_every "
                           "(a moving reference makes cached log-probs stale)")
    if cfg.train.batch_size < 2 and cfg.objective == "kto":
        console.print("[yellow]kto with train.batch_size=1: the KL estimate z0 uses a single mismatched pair[/]")


def prepare_preference(cfg: RunConfig) -> Prepared:
    """Load and validate model and data for a preference run; nothing is written to disk."""
    _check(cfg)
    check_tasks(cfg)
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code,
                            cfg.model.attn_implementation)
    template = get_template(cfg.data.template, tok)
    records = load_records(cfg.data.train, split=cfg.data.split, limit=cfg.data.limit)
    train_recs, eval_recs = _split(records, cfg)
    if cfg.objective == "kto":
        parse, enc = to_unpaired, encode_unpaired
    else:
        parse, enc = to_pair, encode_pairs
    train_s, eval_s = [parse(r) for r in train_recs], [parse(r) for r in eval_recs]
    train, stats = enc(tok, train_s, template, cfg.data.max_length)
    evals, _ = enc(tok, eval_s, template, cfg.data.max_length) if eval_s else ([], None)
    if cfg.objective == "kto":
        from ..objectives.kto import weight_warning

        warning = weight_warning(stats.n_desirable, stats.n_undesirable, cfg.pref.desirable_weight,
                                 cfg.pref.undesirable_weight)
        if warning:
            console.print(f"[yellow]warning: {warning}[/]")
    prompts = [template.generation_prompt(s.prompt) for s in eval_s[:cfg.samples.n_heldout]]
    prompts += [template.generation_prompt([{"role": "user", "content": p}]) for p in cfg.samples.prompts]
    torch.manual_seed(cfg.train.seed)  # adapter (and reward head) init is random: same config, same weights
    report = _apply_method(model, cfg)
    if cfg.objective == "reward":
        from ..objectives.reward import add_reward_head

        add_reward_head(model)
    return Prepared(model, tok, template, train, evals, prompts, stats.as_dict(), report)


def make_pair_stream(examples: list, cfg: RunConfig, pad_id: int) -> BatchStream:
    """Deterministic micro-batches of `batch_size` pairs (or unpaired examples), reshuffled per epoch."""
    bs = cfg.train.batch_size
    fn = collate_unpaired if examples and not hasattr(examples[0], "chosen") else collate_pairs

    def make(epoch: int) -> list[dict]:
        g = torch.Generator().manual_seed(cfg.train.seed * 1000003 + epoch)
        order = torch.randperm(len(examples), generator=g).tolist()
        return [fn([examples[i] for i in order[k:k + bs]], pad_id) for k in range(0, len(order), bs)]

    return BatchStream(make, math.ceil(len(examples) / bs))


def build_reference(cfg: RunConfig, p: Prepared, out: Path):
    """The Reference for dpo/kto, or None when not needed or when log-probs were precomputed (and the full
    copy released). Precomputed log-probs are stored in the examples (`ex.ref`)."""
    if not needs_reference(cfg.objective):
        return None
    from ..objectives.reference import Reference, fill_cache

    r = cfg.reference
    ref = Reference(p.model, r.mode, r.device, r.dtype, r.sync_every, r.sync_alpha, cfg.train.loss_chunk_size)
    if not r.precompute:
        return ref
    t0 = time.perf_counter()
    device = next(p.model.parameters()).device
    sets = {"train": p.train, **({"eval": p.eval} if p.eval else {})}
    loaded = fill_cache(out / "reference_logps.safetensors", ref, sets, p.tokenizer.pad_token_id,
                        batch_size=max(cfg.train.batch_size, 4), tag=f"{cfg.model.name}|{ref.mode}", device=device)
    console.print(f"reference log-probs {'loaded from cache' if loaded else 'precomputed'} "
                  f"({time.perf_counter() - t0:.0f}s)")
    ref.release()
    return None


def _measure(p: Prepared, objective, cfg: RunConfig) -> dict:
    pad = p.tokenizer.pad_token_id
    bs = max(cfg.train.batch_size, 4)
    return {"train": evaluate_pairs(p.model, objective, p.train[:cfg.pref.probe], pad, bs),
            "eval": evaluate_pairs(p.model, objective, p.eval, pad, bs)}


def _save(p: Prepared, cfg: RunConfig, out: Path) -> None:
    if cfg.objective != "reward":
        save_artifacts(p, cfg, out)
        return
    from ..objectives.reward import head_detached, save_reward_head

    save_reward_head(p.model, out)
    with head_detached(p.model):  # the adapter/model folder stays a plain causal LM
        save_artifacts(p, cfg, out)


def _summary(m: dict) -> str:
    keys = ("reward_margin", "pref_accuracy", "logp_margin", "logp_accuracy")
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys if k in m)


def train_preference(cfg: RunConfig, stop_after: int | None = None) -> Path:
    """Run a preference config to completion (or `stop_after` steps); returns the run directory."""
    t0 = time.perf_counter()
    p = prepare_preference(cfg)
    console.print(p.report.summary())
    console.print(f"data: {p.stats['n_examples']} training {'examples' if cfg.objective == 'kto' else 'pairs'} "
                  f"({p.stats['trained_tokens']:,} response tokens of {p.stats['total_tokens']:,}), "
                  f"{len(p.eval)} held out; truncated {p.stats['n_truncated']}, dropped {p.stats['n_dropped']}")
    torch.manual_seed(cfg.train.seed)
    out = _start_run_dir(cfg)
    save_config(cfg, out / "config.yaml")
    reference = build_reference(cfg, p, out)
    objective = with_method(cfg, build_objective(cfg, reference))  # LoReFT: prompt positions per batch
    latest = latest_checkpoint(out / "checkpoints") if cfg.resume else None
    before = _measure(p, objective, cfg)
    console.print(f"before: {_summary(before['train'])}")
    samples_before = [] if latest is not None else _samples(p, cfg)
    # learning/forgetting on eval.target/source, as in SFT runs (a reward model is not a generator: skipped)
    base_tasks = evaluate_base(cfg, p.model, p.tokenizer, p.template) if cfg.objective != "reward" else None
    torch.manual_seed(cfg.train.seed)
    pad = p.tokenizer.pad_token_id
    stream = make_pair_stream(p.train, cfg, pad)

    def evaluate(step: int) -> dict:
        m = evaluate_pairs(p.model, objective, p.eval, pad, max(cfg.train.batch_size, 4))
        return {f"eval_{k}": v for k, v in m.items()}

    res = fit(p.model, objective, stream, cfg.train, out, evaluate=evaluate if p.eval else None,
              resume=cfg.resume, stop_after=stop_after)
    if stop_after is not None and res.steps < total_steps(cfg.train, stream.per_epoch):
        return out
    after = _measure(p, objective, cfg)
    console.print(f"after:  {_summary(after['train'])}")
    samples_after = _samples(p, cfg)
    task_fields = evaluate_final(cfg, p.model, p.tokenizer, p.template, base_tasks)
    _save(p, cfg, out)
    results = {"method": cfg.method, "objective": cfg.objective, "report": p.report.summary(), "data": p.stats,
               "before": before, "after": after, "steps": res.steps, "train_tokens": res.tokens,
               "train_seconds": res.seconds, "tokens_per_s": res.tokens / max(res.seconds, 1e-9),
               "final_train_loss": res.last_loss, "total_seconds": time.perf_counter() - t0,
               "samples": _pair_samples(samples_before, samples_after), **task_fields}
    if cfg.objective == "reward" and p.eval:
        from ..objectives.reward import pairwise_accuracy

        results["eval_pairwise_accuracy"] = pairwise_accuracy(p.model, p.eval, pad)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    console.print(f"{cfg.objective}: {res.steps} steps, {results['tokens_per_s']:,.0f} tokens/s, {res.seconds:.0f}s")
    return out

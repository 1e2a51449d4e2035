"""One training run, end to end: config → data → model (+ adapter) → objective → loop → artifacts.

Everything that can fail because of user input (config, data, template, model, target patterns) is checked
*before* the run directory is touched, so a bad run leaves nothing half-written. The run directory:

    config.yaml        the resolved config
    metrics.jsonl      training and evaluation rows
    checkpoints/       atomic, last K kept — a rerun with the same output_dir resumes from the latest
    adapter/           PEFT-format adapter + tokenizer (adapter methods)   | model/  HF model (full FT)
    results.json       held-out loss and sample generations before/after, timings, data statistics
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.base import AdapterReport, get_method
from ..config import RunConfig, method_options, save_config
from ..data.collate import collate
from ..data.formats import to_sample
from ..data.masking import encode_dataset
from ..data.packing import pack
from ..data.sources import load_records
from ..data.templates import get_template
from ..errors import TunelabError
from ..generate import generate
from ..models.load import load_model
from ..objectives.sft import SFT
from .log import console
from .loop import BatchStream, fit
from .task_eval import check_tasks, evaluate_base, evaluate_during, evaluate_final


@dataclass
class Prepared:
    model: object
    tokenizer: object
    template: object
    train: list
    eval: list
    eval_prompts: list
    stats: dict
    report: object


def _split(records, cfg: RunConfig):
    if cfg.data.eval:
        return records, load_records(cfg.data.eval, split=cfg.data.split)
    n_eval = min(cfg.data.eval_max, int(round(len(records) * cfg.data.eval_fraction)))
    if n_eval == 0:
        return records, []
    g = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(records), generator=g).tolist()
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def prepare(cfg: RunConfig) -> Prepared:
    """Load and validate everything; nothing is written to disk."""
    if not cfg.data.train:
        raise TunelabError("data.train: no training data given (a .jsonl/.json/.csv/.parquet file or a dataset name)")
    check_tasks(cfg)
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code,
                            cfg.model.attn_implementation)
    template = get_template(cfg.data.template, tok)
    records = load_records(cfg.data.train, split=cfg.data.split, limit=cfg.data.limit)
    train_recs, eval_recs = _split(records, cfg)
    enc = dict(template=template, mode=cfg.data.masking, turns=cfg.data.turns, max_length=cfg.data.max_length)
    train_samples = _to_samples(train_recs, cfg.data.format)
    eval_samples = _to_samples(eval_recs, cfg.data.format) if eval_recs else []
    train, stats = encode_dataset(tok, train_samples, **enc)
    evals, _ = encode_dataset(tok, eval_samples, **enc) if eval_samples else ([], None)
    eval_prompts = [template.generation_prompt(_prompt_part(s.messages))
                    for s in eval_samples[:cfg.samples.n_heldout] if s.messages]
    eval_prompts += [template.generation_prompt([{"role": "user", "content": p}]) for p in cfg.samples.prompts]
    torch.manual_seed(cfg.train.seed)  # adapter init is random: same config, same initial weights
    check_method_data(cfg, train + evals)
    report = _apply_method(model, cfg)
    return Prepared(model, tok, template, train, evals, eval_prompts, stats.as_dict(), report)


def _to_samples(records, fmt: str):
    """SFT samples; preference/unpaired records train on prompt + chosen (or desirable) responses."""
    from ..data.preference import is_preference, is_unpaired, sft_samples

    if fmt in ("preference", "unpaired") or (fmt == "auto" and records
                                             and (is_preference(records[0].data) or is_unpaired(records[0].data))):
        return sft_samples(records, fmt)
    return [to_sample(r, fmt) for r in records]


def _prompt_part(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def _apply_method(model, cfg: RunConfig):
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        n = sum(p.numel() for p in model.parameters())
        return AdapterReport(method="full", replaced=[], trainable=n, total=n)
    return get_method(cfg.method).wrap(model, method_options(cfg))


def check_method_data(cfg: RunConfig, examples) -> None:
    """The method's optional `check_examples` refuses data it cannot train on (LoReFT: plain text, no prompt)."""
    check = None if cfg.method == "full" else getattr(get_method(cfg.method), "check_examples", None)
    if check:
        check(examples)


def with_method(cfg: RunConfig, objective):
    """The objective, wrapped by the method's `wrap_objective` where the method needs to see each batch
    (LoReFT: which prompt positions to intervene, from the batch's prompt_mask)."""
    hook = None if cfg.method == "full" else getattr(get_method(cfg.method), "wrap_objective", None)
    return hook(objective) if hook else objective


def make_stream(examples, cfg: RunConfig, pad_id: int) -> BatchStream:
    """Deterministic batches: pack once (if enabled), shuffle rows per epoch with (seed, epoch)."""
    rows = pack(examples, cfg.data.max_length) if cfg.data.packing else [[e] for e in examples]
    bs = cfg.train.batch_size
    per_epoch = math.ceil(len(rows) / bs)

    def make(epoch: int) -> list[dict]:
        g = torch.Generator().manual_seed(cfg.train.seed * 1000003 + epoch)
        order = torch.randperm(len(rows), generator=g).tolist()
        return [collate([rows[i] for i in order[k:k + bs]], pad_id, packed=cfg.data.packing)
                for k in range(0, len(order), bs)]

    return BatchStream(make, per_epoch)


@torch.no_grad()
def eval_loss(model, examples, pad_id: int, batch_size: int = 8, chunk_size: int = 1024, objective=None) -> float:
    """Mean NLL per loss token over `examples` (exp of it is the perplexity)."""
    if not examples:
        return float("nan")
    was = model.training
    model.eval()
    obj, total, n = objective or SFT(chunk_size), 0.0, 0
    device = next(model.parameters()).device
    for k in range(0, len(examples), batch_size):
        batch = {key: v.to(device) for key, v in collate(examples[k:k + batch_size], pad_id).items()}
        ls, cnt, _ = obj.loss(model, batch)
        total, n = total + float(ls), n + int(cnt)
    model.train(was)
    return total / max(n, 1)


def _samples(p: Prepared, cfg: RunConfig) -> list[dict]:
    if not p.eval_prompts:
        return []
    outs = generate(p.model, p.tokenizer, p.eval_prompts, max_new_tokens=cfg.samples.max_new_tokens,
                    stop=p.template.stop_strings)
    return [{"prompt": pr, "completion": o} for pr, o in zip(p.eval_prompts, outs)]


def _start_run_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if (out / "results.json").exists() and not cfg.overwrite:
        raise TunelabError(f"output_dir {out} holds a finished run; pass overwrite=true or another output_dir")
    if out.exists() and (cfg.overwrite or not cfg.resume):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_artifacts(p: Prepared, cfg: RunConfig, out: Path) -> Path:
    """adapter/ (PEFT format) or model/ (HF format), each with the tokenizer carrying the run's template."""
    p.tokenizer.chat_template = p.template.jinja
    full_model = cfg.method in ("full", "freeze")  # partial finetuning exports the whole model, like full
    target = out / ("model" if full_model else "adapter")
    tmp = out / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    if full_model:
        p.model.save_pretrained(tmp)
    else:
        get_method(cfg.method).export_peft(p.model, method_options(cfg), tmp, base_model_name_or_path=cfg.model.name)
    p.tokenizer.save_pretrained(tmp)
    (tmp / "tunelab_template.json").write_text(json.dumps({"name": p.template.name, "jinja": p.template.jinja}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def train(cfg: RunConfig, stop_after: int | None = None) -> Path:
    """Run `cfg` to completion (or to `stop_after` steps, for tests); returns the run directory."""
    if cfg.stages:  # a multi-stage pipeline (train/pipeline.py)
        from .pipeline import run_pipeline

        return run_pipeline(cfg)
    if cfg.objective != "sft":  # dpo, simpo, orpo, kto, reward (train/preference_run.py)
        from .preference_run import train_preference

        return train_preference(cfg, stop_after)
    t0 = time.perf_counter()
    p = prepare(cfg)
    console.print(p.report.summary())
    console.print(f"data: {p.stats['n_examples']} train examples ({p.stats['trained_tokens']:,} loss tokens "
                  f"of {p.stats['total_tokens']:,}), {len(p.eval)} held out; truncated {p.stats['n_truncated']}, "
                  f"fully masked (dropped) {p.stats['n_fully_masked']}")
    torch.manual_seed(cfg.train.seed)
    out = _start_run_dir(cfg)
    save_config(cfg, out / "config.yaml")
    pad = p.tokenizer.pad_token_id
    objective = with_method(cfg, SFT(cfg.train.loss_chunk_size))
    before = {"eval_loss": eval_loss(p.model, p.eval, pad, objective=objective)}
    resuming = (out / "checkpoints").exists() and any((out / "checkpoints").iterdir())
    samples_before = [] if resuming else _samples(p, cfg)
    console.print(f"held-out loss before: {before['eval_loss']:.4f}")
    base_tasks = evaluate_base(cfg, p.model, p.tokenizer, p.template)
    torch.manual_seed(cfg.train.seed)  # task evaluation may sample; training randomness must not depend on it
    stream = make_stream(p.train, cfg, pad)

    def evaluate(step: int) -> dict:
        row = {"eval_loss": eval_loss(p.model, p.eval, pad, objective=objective),
               **evaluate_during(cfg, p.model, p.tokenizer, p.template)}
        if cfg.samples.at_eval and step < _total(cfg, stream):  # the final samples go to results.json
            with (out / "samples.jsonl").open("a") as f:
                for s_ in _samples(p, cfg):
                    f.write(json.dumps({"step": step, **s_}) + "\n")
        return row

    res = fit(p.model, objective, stream, cfg.train, out, evaluate=evaluate,
              resume=cfg.resume, stop_after=stop_after)
    if stop_after is not None and res.steps < _total(cfg, stream):
        return out
    after = {"eval_loss": eval_loss(p.model, p.eval, pad, objective=objective)}
    samples_after = _samples(p, cfg)
    task_fields = evaluate_final(cfg, p.model, p.tokenizer, p.template, base_tasks)
    save_artifacts(p, cfg, out)
    results = {"method": cfg.method, "objective": cfg.objective, "report": p.report.summary(),
               "trainable_params": p.report.trainable, "total_params": p.report.total, "data": p.stats,
               "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
               "steps": res.steps, "train_tokens": res.tokens, "train_seconds": res.seconds,
               "tokens_per_s": res.tokens / max(res.seconds, 1e-9), "final_train_loss": res.last_loss,
               "total_seconds": time.perf_counter() - t0,
               "samples": _pair_samples(samples_before, samples_after), **task_fields}
    results = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in results.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    console.print(f"held-out loss: {before['eval_loss']:.4f} → {after['eval_loss']:.4f}; "
                  f"{res.steps} steps, {results['tokens_per_s']:,.0f} tokens/s, {res.seconds:.0f}s")
    return out


def _pair_samples(before: list[dict], after: list[dict]) -> list[dict]:
    """Before/after completions per prompt (no "before" when the run was resumed mid-way)."""
    old = {b["prompt"]: b["completion"] for b in before}
    return [{"prompt": a["prompt"], **({"before": old[a["prompt"]]} if a["prompt"] in old else {}),
             "after": a["completion"]} for a in after]


def _total(cfg, stream):
    from .loop import total_steps

    return total_steps(cfg.train, stream.per_epoch)

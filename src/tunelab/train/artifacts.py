"""What a run writes besides checkpoints and metrics: sample generations, the adapter/ or model/ folder and
results.json (the run directory itself: `rundir`).

    adapter/   the method's export (PEFT format where PEFT has the method, tunelab's own otherwise) + tokenizer
    model/     full and partial finetuning: a plain HF model folder + tokenizer
               (a SentencePiece tokenizer's `tokenizer.model` included: GGUF export reads its piece scores)
    results.json  one JSON object; NaN becomes null (JSON has no NaN)

Folders are written to a temporary sibling and renamed, so a crash never leaves a half-written adapter; a
full disk removes the temporary folder and stops with one line (how much was needed, where). Weights with
NaN/inf are refused before anything is written.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..adapters.base import export_method, saves_full_model
from ..config import RunConfig, method_options
from ..generate import generate
from ..models.load import save_tokenizer
from .guards import check_finite, disk_full, is_disk_full, tensor_bytes


def generate_samples(model, tokenizer, template, prompts: list[str], cfg: RunConfig) -> list[dict]:
    """Greedy completions of the held-out / configured prompts: [{"prompt", "completion"}]."""
    if not prompts:
        return []
    outs = generate(model, tokenizer, prompts, max_new_tokens=cfg.samples.max_new_tokens, stop=template.stop_strings)
    return [{"prompt": p, "completion": o} for p, o in zip(prompts, outs)]


def pair_samples(before: list[dict], after: list[dict]) -> list[dict]:
    """Before/after completions per prompt (no "before" when the run was resumed mid-way)."""
    old = {b["prompt"]: b["completion"] for b in before}
    return [{"prompt": a["prompt"], **({"before": old[a["prompt"]]} if a["prompt"] in old else {}),
             "after": a["completion"]} for a in after]


def save_artifacts(model, tokenizer, template, cfg: RunConfig, out: Path, state_dict: dict | None = None) -> Path:
    """adapter/ (the method's export) or model/ (HF format), each with the tokenizer carrying the run's template.
    `state_dict`: the full weights when the model's own are sharded (FSDP2, gathered by `Engine.full_state_dict`)."""
    whole = saves_full_model(cfg.method)
    target = out / ("model" if whole else "adapter")
    tmp = out / f".tmp-{target.name}"
    saved = (list(state_dict.items()) if whole and state_dict is not None  # FSDP2: the gathered full weights
             else [(n, p) for n, p in model.named_parameters() if whole or p.requires_grad])
    check_finite(saved, f"{target.name}/")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if whole:
            model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        else:
            export_method(model, cfg.method, method_options(cfg), tmp, base_model_name_or_path=cfg.model.name)
        own = tokenizer.chat_template  # the caller's tokenizer is left as it was (it may be shared)
        tokenizer.chat_template = template.jinja
        try:
            save_tokenizer(tokenizer, tmp)  # + tokenizer.model (SentencePiece), which GGUF export needs
        finally:
            tokenizer.chat_template = own
        (tmp / "tunelab_template.json").write_text(json.dumps({"name": template.name, "jinja": template.jinja}))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full(f"{target.name}/", out, tensor_bytes(p for _, p in saved),
                            "the partial folder was removed; the checkpoints are kept") from None
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_results(out: Path, results: dict) -> Path:
    """results.json, written to a temporary file and renamed: it marks a run finished, so never half of it."""
    path = out / "results.json"
    tmp = out / ".tmp-results.json"  # a run counts as finished once results.json exists: never half of it
    try:
        tmp.write_text(json.dumps(_json_safe(results), indent=2))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full("results.json", out) from None
        raise
    tmp.replace(path)
    return path

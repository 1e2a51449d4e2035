"""What a run writes besides checkpoints and metrics: the run directory itself, sample generations, the
adapter/ or model/ folder and results.json.

    adapter/   the method's export (PEFT format where PEFT has the method, tunelab's own otherwise) + tokenizer
    model/     full and partial finetuning: a plain HF model folder + tokenizer
    results.json  one JSON object; NaN becomes null (JSON has no NaN)

Folders are written to a temporary sibling and renamed, so a crash never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..adapters.base import export_method, saves_full_model
from ..config import RunConfig, method_options
from ..errors import TunelabError
from ..generate import generate


def start_run_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if (out / "results.json").exists() and not cfg.overwrite:
        raise TunelabError(f"output_dir {out} holds a finished run; pass overwrite=true or another output_dir")
    if out.exists() and (cfg.overwrite or not cfg.resume):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


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
    tokenizer.chat_template = template.jinja
    whole = saves_full_model(cfg.method)
    target = out / ("model" if whole else "adapter")
    tmp = out / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    if whole:
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    else:
        export_method(model, cfg.method, method_options(cfg), tmp, base_model_name_or_path=cfg.model.name)
    tokenizer.save_pretrained(tmp)
    (tmp / "tunelab_template.json").write_text(json.dumps({"name": template.name, "jinja": template.jinja}))
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
    path = out / "results.json"
    path.write_text(json.dumps(_json_safe(results), indent=2))
    return path

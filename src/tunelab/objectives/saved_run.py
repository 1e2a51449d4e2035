"""Loading a finished run back: the one loader every caller uses (`export.load_run`, `tunelab generate`/`chat`,
GGUF export, reward models for PPO's value initialisation and the ``reward_model`` reward).

`load_run(RUN_DIR)` rebuilds exactly what was trained: the base model from the run's ``config.yaml``, the
adapter from ``adapter/`` (PEFT format, loaded by tunelab's own reader) or the full model from ``model/``, the
run's tokenizer and the run's chat template (``tunelab_template.json`` beside the weights — a run trained with
``data.template: llama3`` on a tokenizer whose own template is another one must be prompted the way it was
trained). A plain model reference (no ``config.yaml``) loads with the tokenizer's template.

It sits in objectives/ — not in export.py — because objectives load runs too (a reward model is a finished
``objective: reward`` run) and may import nothing below themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters.base import load_method, saves_full_model
from ..errors import TunelabError
from ..models.load import load_model
from ..userfiles import read_text
from ..yamlfile import load_yaml_lines


def run_info(run_dir: Path) -> dict:
    """{"config": the run's config.yaml as a dict, "artifact": its adapter/ or model/ folder}; one-line errors
    for a folder that is not a run or a run that has not finished."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise TunelabError(f"{run_dir} is not a tunelab run directory (no config.yaml)")
    cfg = run_config(cfg_path)
    # full and freeze (partial finetuning) runs save the whole HF model; adapter methods their adapter; a config
    # that names no method (written by hand) is read by what the folder holds
    method = cfg.get("method")
    full = saves_full_model(method) if method else (run_dir / "model").is_dir()
    art = run_dir / ("model" if full else "adapter")
    if not art.is_dir():
        raise TunelabError(f"{run_dir}: the run has not finished ({art.name}/ is missing)")
    return {"config": cfg, "artifact": art}


def run_config(path: Path) -> dict:
    """The keys of a run's saved config that loading it needs, type-checked (one line naming the file:line); the
    rest is not validated, so a run saved by an older tunelab with keys since renamed still loads."""
    cfg, lines = load_yaml_lines(read_text(path), str(path))  # bounded (yamlfile.py)
    if not isinstance(cfg, dict):
        raise TunelabError(f"{path}: not a run config (expected a mapping of keys to values)")
    model = cfg.get("model", {})
    checks = [(("method",), cfg.get("method", "lora"), str), (("model",), model, dict)]
    if isinstance(model, dict):
        checks += [(("model", "name"), model.get("name"), str),
                   (("model", "trust_remote_code"), model.get("trust_remote_code", False), bool),
                   (("model", "allow_pickle"), model.get("allow_pickle", False), bool)]
    for key, value, kind in checks:
        if not isinstance(value, kind):
            line = next((lines[key[:i]] for i in range(len(key), 0, -1) if key[:i] in lines), None)
            raise TunelabError(f"{path}{f':{line}' if line else ''}: {'.'.join(key)}: expected "
                               f"{ {str: 'a string', dict: 'a mapping', bool: 'true or false'}[kind]}, got {value!r}")
    return cfg


def load_run(run_dir: str | Path, device: str = "auto", dtype: str | None = "auto"):
    """(model, tokenizer, template) of a finished run, or of a plain model reference. `dtype` None: the run's
    own ``model.dtype``."""
    from ..data.templates import from_jinja, get_template

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():  # a model reference, not a run
        model, tok = load_model(str(run_dir), dtype or "auto", device)
        return model, tok, get_template("auto", tok)
    info = run_info(run_dir)
    cfg, art = info["config"], info["artifact"]
    mcfg = cfg.get("model", {}) or {}
    dtype = dtype or mcfg.get("dtype", "auto") or "auto"
    if art.name == "model":
        model, tok = load_model(str(art), dtype, device, mcfg.get("trust_remote_code", False))
    else:
        model, tok = load_model(mcfg["name"], dtype, device, mcfg.get("trust_remote_code", False),
                                allow_pickle=mcfg.get("allow_pickle", False))
        try:
            load_method(model, cfg.get("method") or "lora", art)
        except (TunelabError, NotImplementedError):
            raise
        except Exception as e:  # a truncated or damaged adapter file: safetensors / json say why in their words
            if type(e).__name__ != "SafetensorError" and not isinstance(e, (ValueError, EOFError, OSError)):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TunelabError(f"{art}: cannot read the saved adapter ({first}); the file is damaged or "
                               "truncated — train again, or load an earlier checkpoint's adapter") from None
        if (art / "tokenizer_config.json").exists():  # the run's tokenizer, carrying its chat template
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(art))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
    model.eval()
    meta = art / "tunelab_template.json"
    if meta.exists():
        t = json.loads(meta.read_text())
        template = from_jinja(t["name"], t["jinja"], tok)
    else:
        template = get_template("auto", tok)
    return model, tok, template

"""Load a finished run back, and export it.

`load_run(RUN_DIR)` rebuilds exactly what was trained: the base model from the run's `config.yaml`, the
adapter from `adapter/` (PEFT format, loaded by tunelab's own reader) or the full model from `model/`, and the
run's chat template. `export_merged` folds the adapter into the base weights and writes a plain Hugging Face
folder that `AutoModelForCausalLM.from_pretrained` loads, with the tokenizer (a SentencePiece tokenizer's
`tokenizer.model` included) and the run's chat template; weights with NaN/inf are refused, and a full disk
stops with one line and no half-written folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .adapters.base import load_method, merge, saves_full_model
from .errors import TunelabError
from .models.load import load_model, save_tokenizer
from .train.guards import check_finite, disk_full, is_disk_full, tensor_bytes
from .userfiles import check_can_create, make_folder, read_text
from .yamlfile import load_yaml_lines


def run_info(run_dir: Path) -> dict:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise TunelabError(f"{run_dir} is not a tunelab run directory (no config.yaml)")
    cfg = _run_config(cfg_path)
    # full and freeze (partial finetuning) runs save the whole HF model; adapter methods their adapter
    art = run_dir / ("model" if saves_full_model(cfg.get("method", "lora")) else "adapter")
    if not art.is_dir():
        raise TunelabError(f"{run_dir}: the run has not finished ({art.name}/ is missing)")
    return {"config": cfg, "artifact": art}


def _run_config(path: Path) -> dict:
    """The keys of a run's saved config that loading it needs, type-checked (one line naming the file); the rest
    is not validated, so a run saved by an older tunelab with keys since renamed still loads."""
    cfg, lines = load_yaml_lines(read_text(path), str(path))
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


def load_run(run_dir: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, template) of a finished run, or of a plain model reference."""
    from .data.templates import from_jinja, get_template

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():  # a model reference, not a run
        model, tok = load_model(str(run_dir), dtype, device)
        return model, tok, get_template("auto", tok)
    info = run_info(run_dir)
    cfg, art = info["config"], info["artifact"]
    mcfg = cfg.get("model", {})
    if art.name == "model":
        model, tok = load_model(str(art), dtype, device, mcfg.get("trust_remote_code", False))
    else:
        model, tok = load_model(mcfg["name"], dtype, device, mcfg.get("trust_remote_code", False),
                               allow_pickle=mcfg.get("allow_pickle", False))
        try:
            load_method(model, cfg.get("method", "lora"), art)
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


def export_merged(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge the run's adapter into its base model and save an HF folder (+ tokenizer and template)."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunelabError(f"export: {out} exists and is not an empty folder")
    check_can_create(out, "export: --merged")  # before minutes of loading and merging
    run_info(run_dir)  # a clear error if this is not a finished run
    model, tok, template = load_run(run_dir, device="cpu")
    merge(model)  # a no-op for a whole saved model (full, freeze)
    check_finite(model.named_parameters(), f"the merged model {out}")
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_folder(out.parent, "export: --merged")
    tok.chat_template = template.jinja
    try:
        model.save_pretrained(tmp)
        save_tokenizer(tok, tmp)  # + tokenizer.model of a SentencePiece tokenizer (GGUF export needs it)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full("the merged model", out.parent, tensor_bytes(model.parameters())) from None
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out

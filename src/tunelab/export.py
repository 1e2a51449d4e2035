"""Load a finished run back, and export it.

`load_run(RUN_DIR)` rebuilds exactly what was trained: the base model from the run's `config.yaml`, the
adapter from `adapter/` (PEFT format, loaded by tunelab's own reader) or the full model from `model/`, and the
run's chat template (the one loader, `objectives/saved_run.py`, re-exported here). `export_merged` folds the adapter into the base weights and writes a plain Hugging Face
folder that `AutoModelForCausalLM.from_pretrained` loads, with the tokenizer (a SentencePiece tokenizer's
`tokenizer.model` included) and the run's chat template; weights with NaN/inf are refused, and a full disk
stops with one line and no half-written folder. `dtype` (bf16 | f16 | f32) saves the weights in that type: the
run is loaded and merged in float32 (W + B·A·scale computed once, in full precision) and the sum is rounded to
`dtype` once, so the file equals the f32 merge cast to it; config.json's `dtype` says the same. A merge whose
weights exceed float16's range (±65504) is refused for f16 rather than saved as inf.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .adapters.base import merge
from .errors import TunelabError
from .models.load import save_tokenizer
from .objectives.saved_run import load_run, run_info
from .train.guards import check_finite, disk_full, is_disk_full, tensor_bytes
from .userfiles import check_can_create, make_folder


DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


def export_merged(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Merge the run's adapter into its base model and save an HF folder (+ tokenizer and template); `dtype`
    (bf16 | f16 | f32) casts the float32 merge, None keeps the dtype the run loads in."""
    import torch

    run_dir, out = Path(run_dir), Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise TunelabError(f"export: --dtype {dtype!r} is unknown; choose from {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TunelabError(f"export: {out} exists and is not an empty folder")
    check_can_create(out, "export: --merged")  # before minutes of loading and merging
    run_info(run_dir)  # a clear error if this is not a finished run
    model, tok, template = load_run(run_dir, device="cpu", **({"dtype": "float32"} if dtype else {}))
    merge(model)  # a no-op for a whole saved model (full, freeze)
    check_finite(model.named_parameters(), f"the merged model {out}")
    if dtype is not None:
        target = getattr(torch, DTYPES[dtype])
        if target == torch.float16:
            for name, p in model.named_parameters():
                if p.is_floating_point() and p.detach().abs().max().item() > torch.finfo(torch.float16).max:
                    raise TunelabError(f"export: --dtype f16: {name} has weights beyond float16's range "
                                       "(±65504); use --dtype bf16 or f32")
        model.to(target)
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

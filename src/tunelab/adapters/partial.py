"""Partial finetuning (`method: freeze`, alias `partial`): train some decoder blocks fully, freeze the rest.

Freezing all but the top layers is the oldest transfer-learning recipe (Yosinski et al. 2014, "How transferable
are features in deep neural networks?"; for LMs e.g. Lee et al. 2019, "What Would Elsa Do? Freezing Layers
During Transformer Fine-Tuning", arXiv:1911.03090): the last blocks are the most task-specific, and training
them alone costs no adapter math at all. Per trained parameter θ (initial value θ0):

    enabled:  the model uses θ (trainable)          disabled:  the model uses θ0 (frozen snapshot)

What is trained (`FreezeConfig`):

* `layers`: an int N = the last N decoder blocks; a list = those block indices (negative counts from the end);
  `"all"` or `"none"`;
* `modules`: further name patterns trained fully (suffix / glob / regex as for LoRA targets), e.g. `norm`;
* `train_embeddings`, `train_lm_head`: the input embeddings / output head, fully.

Every parameter-holding module selected is wrapped in `extras.FullyTrained`, LoRA's `modules_to_save`
machinery: keys and Parameters stay the base model's own (`model.layers.29.mlp.up_proj.weight`), and a frozen
snapshot makes `disabled(model)` exactly the base model (the DPO reference without a second model), at the cost
of one copy of the trained part. Tied embeddings (SmolLM2, Gemma): with `ensure_weight_tying` (default) asking
for either the embeddings or the head trains the one shared matrix, and both stay tied; without it only the
named module trains, on its own copy, and the model is untied.

`merge` puts the trained Parameters back into the plain modules. A run saves the full HF model (`model/`, as
full finetuning: `base.saves_full_model('freeze')` is True); `export` writes only the trained tensors in the
tunelab format (native_format.py) for a compact copy, and `load` reads them back onto the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt
from torch import nn

from ..errors import TunelabError
from . import base, extras
from .base import (AdapterReport, adapter_state_dict, disabled, load_adapter_state_dict,  # noqa: F401
                   merge, set_enabled)
from .lora import as_config
from .native_format import WEIGHTS_FILE, base_model_name, load_native, save_native


SAVES_FULL_MODEL = True  # a run saves the whole HF model (model/), see base.saves_full_model


class FreezeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layers: NonNegativeInt | list[int] | Literal["all", "none"] = Field(
        2, description="decoder blocks to train: N = the last N, a list of indices, 'all' or 'none'")
    modules: list[str] = Field(default_factory=list, description="more modules trained fully (name patterns)")
    train_embeddings: bool = Field(False, description="train the input embeddings fully")
    train_lm_head: bool = Field(False, description="train the output head fully")
    ensure_weight_tying: bool = Field(True, description="tied embed/lm_head stay one trained weight")


Config = FreezeConfig


def _block_ids(spec, n: int) -> list[int]:
    if spec == "all":
        return list(range(n))
    if spec == "none":
        return []
    if isinstance(spec, int):
        if not 0 <= spec <= n:
            raise TunelabError(f"freeze.layers: cannot train the last {spec} blocks; the model has {n}")
        return list(range(n - spec, n))
    bad = [i for i in spec if not -n <= i < n]
    if bad:
        raise TunelabError(f"freeze.layers: block {bad[0]} does not exist; the model has {n} (0..{n - 1})")
    return sorted({i % n for i in spec})


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def wrap(model: nn.Module, cfg: FreezeConfig | dict | None = None) -> AdapterReport:
    """Freeze `model` except the selected blocks/modules, which are trained fully (see the module docstring)."""
    cfg = as_config(cfg, FreezeConfig)
    base.ensure_no_adapter(model, "freeze")
    stack = base.decoder_stack(model)
    n = len(model.get_submodule(stack)) if stack else 0
    blocks = [f"{stack}.{i}" for i in _block_ids(cfg.layers, n)] if stack else []
    patterns = list(blocks) + list(cfg.modules)
    named = {}
    if cfg.train_embeddings:
        named["train_embeddings"] = _module_name(model, model.get_input_embeddings())
    if cfg.train_lm_head:
        named["train_lm_head"] = _module_name(model, model.get_output_embeddings())
    for key, name in named.items():
        if name is None:
            raise TunelabError(f"freeze.{key}: the model has no such module")
        patterns.append(name)
    if not patterns:
        raise TunelabError("freeze: nothing to train; set layers, modules, train_embeddings or train_lm_head")
    names = extras.resolve(model, patterns, what="freeze", keep_tied=cfg.ensure_weight_tying)
    base.freeze(model)
    tied = extras.wrap(model, names, keep_tied=cfg.ensure_weight_tying)
    in_blocks = [x for x in names if any(x.startswith(b + ".") for b in blocks)]
    trainable, total = base.count_parameters(model)
    notes = [f"trained blocks: {', '.join(b.rpartition('.')[2] for b in blocks)} of {n}" if blocks
             else "no decoder block trained"]
    return AdapterReport(method="freeze", replaced=in_blocks, trainable=trainable, total=total,
                         extras=[x for x in names if x not in in_blocks], tied=tied, notes=notes)


def export(model: nn.Module, cfg: FreezeConfig | dict | None, path: str | Path,
           base_model_name_or_path: str | None = None) -> Path:
    """Write only the trained tensors in the tunelab format (native_format.py; runs save the full model instead):

    * `tunelab_adapter.json`: the format header ({"format": "tunelab-adapter", "version": 1, "method": "freeze",
      "base_model_name_or_path"}) plus "modules": [module paths trained fully], "ensure_weight_tying";
    * `adapter_model.safetensors`: their tensors under the base model's own keys (a tied pair once).
    """
    mods = [n for n, _ in base.adapter_modules(model)]
    if not mods:
        raise TunelabError("export: the model has no partially trained modules; wrap it first")
    fields = {"modules": mods, "ensure_weight_tying": bool(extras.tied_groups(model, mods))}
    return save_native(path, "freeze", fields, adapter_state_dict(model),
                       base_model_name(model, base_model_name_or_path))


def load(model: nn.Module, path: str | Path) -> AdapterReport:
    """Wrap `model` like the saved run and load its trained tensors."""
    meta, tensors = load_native(path, "freeze")
    cfg = FreezeConfig(layers="none", modules=list(meta.get("modules") or []),
                       ensure_weight_tying=bool(meta.get("ensure_weight_tying", True)))
    try:
        report = wrap(model, cfg)
    except TunelabError as e:
        raise TunelabError(f"{path}: {e}") from None
    load_adapter_state_dict(model, tensors, source=str(Path(path) / WEIGHTS_FILE))
    report.notes.append(f"loaded tunelab partial-finetuning tensors {path}")
    return report

"""Full finetuning (`method: full`): every parameter of the model is trained; there is no adapter.

The method module with the same interface as the adapter methods, so nothing outside `adapters/` names
"full" to wrap, export or load a model:

* `wrap` makes every parameter trainable and reports trainable = total (unique Parameters: a tied
  embedding/head weight counts once);
* `merge` is a no-op (the weights already are the trained model);
* `export` writes the whole model as a Hugging Face folder (`save_pretrained`, safetensors) and `load` copies
  such a folder's weights into a model of the same architecture. A run saves `model/` itself
  (`base.saves_full_model("full")` is True), as for `freeze`;
* there is no adapter to switch off: `disabled(model)` raises (a reference for full finetuning is a frozen copy,
  see objectives/reference.py), `adapter_state_dict` is empty.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict
from torch import nn

from ..errors import TunelabError
from . import base
from .base import AdapterReport, adapter_state_dict, disabled, load_adapter_state_dict, set_enabled  # noqa: F401


SAVES_FULL_MODEL = True  # a run saves the whole HF model (model/), see base.saves_full_model


class FullConfig(BaseModel):
    """Full finetuning has no options (the run's `train:` section sets the optimiser)."""

    model_config = ConfigDict(extra="forbid")


Config = FullConfig


def wrap(model: nn.Module, cfg: FullConfig | dict | None = None) -> AdapterReport:
    """Make every parameter of `model` trainable; trainable = total."""
    if isinstance(cfg, dict):
        FullConfig(**cfg)  # no options: an unknown key is an error, not silently ignored
    base.ensure_no_adapter(model, "full")
    for p in model.parameters():
        p.requires_grad_(True)
    trainable, total = base.count_parameters(model)
    return AdapterReport(method="full", replaced=[], trainable=trainable, total=total)


def merge(model: nn.Module) -> list[str]:
    """Nothing to fold in: the trained weights are the model. Returns no merged module names."""
    return []


def export(model: nn.Module, cfg: FullConfig | dict | None, path: str | Path,
           base_model_name_or_path: str | None = None) -> Path:
    """Write the whole model as a Hugging Face folder (config.json + safetensors) at `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


def load(model: nn.Module, path: str | Path) -> AdapterReport:
    """Copy the weights of the HF folder `path` (a full-finetuning run's `model/`) into `model`, which must have
    the same architecture, and make them trainable as `wrap` does."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise TunelabError(f"{path}: not a Hugging Face model folder (no config.json)")
    dtype = next(model.parameters()).dtype
    try:
        saved = type(model).from_pretrained(str(path), dtype=dtype, use_safetensors=True)  # tunelab wrote it
        model.load_state_dict(saved.state_dict(), strict=True)
    except (OSError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TunelabError(f"{path}: cannot load these weights into the model ({first})") from None
    report = wrap(model)
    report.notes.append(f"loaded full model weights {path}")
    return report

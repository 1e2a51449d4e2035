"""LoReFT: low-rank linear subspace representation finetuning (Wu et al. 2024, "ReFT: Representation
Finetuning for Language Models", arXiv:2404.03592; reference implementation github.com/stanfordnlp/pyreft,
`LoreftIntervention`, `get_intervention_locations`).

Instead of changing weights, LoReFT edits the residual stream: the hidden state h ∈ R^d a decoder layer outputs,
at a few prompt positions, is replaced by

    Φ(h) = h + Rᵀ (W h + b − R h)          R ∈ R^{r×d} with orthonormal rows (R Rᵀ = I),  W ∈ R^{r×d}, b ∈ R^r

i.e. the coordinates R h of h in the r-dimensional subspace spanned by R's rows move to W h + b; the component
of h orthogonal to that subspace is untouched. 2·r·d + r parameters per intervention; the base model stays frozen
and bit-for-bit untouched (no weight is replaced).

Orthonormality: R = orthonormal_rows(A) for an unconstrained trainable A ∈ R^{r×d}: the Q factor of Aᵀ = QU
with diag(U) > 0 (Gram–Schmidt on A's rows), so R Rᵀ = I holds to rounding after any update, and an A with
orthonormal rows is its own R. We do not use torch's `parametrizations.orthogonal`: its Householder form stores
±1 on the diagonal of the raw matrix and reads it with `.int()`, so the optimizer's weight decay (which applies
to every matrix) shrinks those entries below 1 and silently zeroes rows of R. QR is scale-invariant, so weight
decay on A is harmless. Init as pyreft: R random orthonormal, W/b as nn.Linear (so Φ ≠ id at step 0).
Dropout acts on the edit, Φ(h) = h + Rᵀ·drop(W h + b − R h); pyreft drops the whole output instead, which
would also zero parts of h itself at the intervened positions.

Where (the paper's hyper-parameters `layers` and `positions`, e.g. "f7+l7"): the output of each chosen decoder
block, at the first `f` and the last `l` tokens of the prompt. Prefix and suffix positions get separate
interventions unless `share_weights`. If f + l exceeds a prompt's length P the two are capped so they never
overlap: each side gets up to ⌈P/2⌉ / ⌊P/2⌋ and a side that needs less leaves the rest to the other (pyreft
caps both at ⌊P/2⌋ and may leave a middle token out). Only prompt tokens are intervened, never generated ones,
and "the prompt" is the same text in training and generation, whatever `data.masking` trains on
(loreft_positions.py has the details):

* training/scoring (`batch_context`, the method's per-batch hook, which `objectives.logprobs` enters around every
  scoring forward through `adapters.base.batch_context`): the batch's `prompt_mask` marks each document's prompt
  span (packed rows: per document) — the rendered conversation before the first trained assistant response,
  i.e. what `Template.generation_prompt` renders for it. Data without a prompt (plain text) is refused;
* otherwise (generation, plain `model(ids)`): the prompt is the attended input of a forward that starts with an
  empty KV cache (the prefill); a forward continuing a non-empty cache (decoding) is not intervened. With the
  KV cache this equals re-running the whole sequence with the prompt positions intervened (causality). So
  scoring a full prompt+response sequence with a plain `model(ids)` (outside `batch_context`) would treat all of
  it as the prompt.

Mechanics: each chosen block gets a child `loreft` (a `LoreftLayer` holding the interventions) and a forward
hook that applies it to the block's output; the decoder body gets a forward pre-hook that works out the
positions of each forward. Hooks find their state through the modules they are called with, so a deep copy of
the model carries its own working interventions. Merging is impossible (a position-dependent edit of hidden
states is no weight matrix): `merge` raises. Saved with `export` in the tunelab format (native_format.py).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..errors import TunelabError
from . import base
from .base import (AdapterModule, AdapterReport, adapter_state_dict, disabled,  # noqa: F401 (re-exported)
                   load_adapter_state_dict, set_enabled)
from .lora import adapter_dtype, as_config
from .loreft_positions import (NO_PROMPT, batch_codes, forward_codes, forward_kwargs,  # noqa: F401
                               prompt_locations)
from .native_format import WEIGHTS_FILE, base_model_name, load_native, save_native

_POSITIONS = re.compile(r"^[fl](\d+)$")
NOT_MERGEABLE = ("loreft cannot be merged: it edits hidden states at chosen prompt positions only, which no "
                 "weight matrix can express; use the run with its adapter (tunelab generate/eval RUN_DIR)")


def parse_positions(spec: str) -> tuple[int, int]:
    """'f7+l7' → (7, 7); 'f3' → (3, 0); 'l5' → (0, 5) (either order, each side at most once)."""
    counts = {"f": None, "l": None}
    for part in spec.replace(" ", "").split("+"):
        m = _POSITIONS.match(part)
        if m is None or counts[part[0]] is not None:
            raise ValueError(f"'{spec}' is not a position spec like f7+l7, f5 or l3")
        counts[part[0]] = int(m.group(1))
    return counts["f"] or 0, counts["l"] or 0


class LoreftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layers: Literal["all"] | list[int] = Field("all", description="decoder blocks to intervene (index or 'all')")
    positions: str = Field("f7+l7", description="first-N / last-M prompt tokens, e.g. f7+l7, f5, l3")
    share_weights: bool = Field(False, description="one intervention for prefix and suffix positions")
    r: int = Field(4, ge=1, description="rank of the intervened subspace")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the edit W h + b − R h")
    init_from: str | None = Field(None, description="start from a saved LoReFT adapter (a tunelab run folder or its "
                                  "adapter/ folder; same settings) loaded before step 0 (adapters/init_from.py)")

    @field_validator("positions")
    @classmethod
    def _valid_positions(cls, value: str) -> str:
        f, last = parse_positions(value)
        if f + last == 0:
            raise ValueError("intervenes on no position; give e.g. f7+l7")
        return value

    @field_validator("layers")
    @classmethod
    def _nonempty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("empty list; give block indices or 'all'")
        return value


Config = LoreftConfig
# tensors `export` writes for readers only (R, derived from the trained `rotate`): skipped when a folder is loaded
DERIVED_SUFFIXES = (".R",)


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt on the rows of `a` [r, d] (r ≤ d), differentiably: Q of the QR of aᵀ, diag(U) > 0."""
    q, u = torch.linalg.qr(a.float().mT)
    sign = torch.sign(torch.diagonal(u, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign.unsqueeze(-2)).mT.to(a.dtype)


class LoreftIntervention(AdapterModule):
    """Φ(h) = h + Rᵀ(W h + b − R h) on the last dimension of h."""

    def __init__(self, d: int, r: int, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if r > d:
            raise TunelabError(f"loreft.r={r} exceeds the hidden size {d}")
        self.rotate = nn.Parameter(nn.init.orthogonal_(torch.empty(r, d, device=device, dtype=dtype)))
        self.learned_source = nn.Linear(d, r, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def R(self) -> torch.Tensor:  # noqa: N802 (the paper's name)
        return orthonormal_rows(self.rotate)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.rotate.dtype)
        R = self.R
        edit = self.learned_source(x) - x @ R.T
        return (x + self.dropout(edit) @ R).to(h.dtype)

    def adapter_parameter_names(self) -> list[str]:
        return ["rotate", "learned_source.weight", "learned_source.bias"]

    def unwrap(self, in_place: bool = True) -> nn.Module:
        raise TunelabError(NOT_MERGEABLE)

    def extra_repr(self) -> str:
        return f"d={self.rotate.shape[1]}, r={self.rotate.shape[0]}"


class _State:
    """Per-model settings and the positions of the forward in flight (codes [B, T]: 0 none, 1 prefix, 2 suffix)."""

    def __init__(self, cfg: LoreftConfig, layer_ids: list[int], d: int):
        self.cfg, self.layer_ids, self.d = cfg, layer_ids, d
        self.first, self.last = parse_positions(cfg.positions)
        self.explicit: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input_ids, codes) set by batch_context
        # Kept after the forward on purpose: gradient checkpointing re-runs the block hooks during backward.
        self.current: torch.Tensor | None = None


class LoreftLayer(nn.Module):
    """The interventions of one decoder block, attached to it as `<block>.loreft`."""

    def __init__(self, state: _State, device, dtype):
        super().__init__()
        self.state = state  # a plain attribute: deep copies of the model copy it along with this module
        cfg, d = state.cfg, state.d
        make = lambda: LoreftIntervention(d, cfg.r, cfg.dropout, device, dtype)  # noqa: E731
        if cfg.share_weights:
            self.shared = make()
        else:
            if state.first:
                self.prefix = make()
            if state.last:
                self.suffix = make()

    def apply(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if tuple(codes.shape) != tuple(h.shape[:2]):
            raise RuntimeError(f"loreft: positions {tuple(codes.shape)} do not fit hidden states {tuple(h.shape)}")
        out = h
        if hasattr(self, "shared"):
            parts = [(codes > 0, self.shared)]
        else:
            parts = [(codes == 1, getattr(self, "prefix", None)), (codes == 2, getattr(self, "suffix", None))]
        for mask, iv in parts:
            if iv is not None and iv.adapter_enabled and bool(mask.any()):
                # torch.where, not a masked add: untouched positions stay bit-identical
                out = torch.where(mask.unsqueeze(-1), iv(h), out)
        return out


def _block_hook(module, args, output):
    state = module.loreft.state
    if state.current is None:
        return None
    if isinstance(output, tuple):
        return (module.loreft.apply(output[0], state.current), *output[1:])
    return module.loreft.apply(output, state.current)


def _body_pre_hook(module, args, kwargs):
    state = module.__dict__["_tunelab_loreft"]
    kwargs = forward_kwargs(module, args, kwargs)
    ids = kwargs.get("input_ids")
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    state.current = None if ref is None else _locate(state, ids, tuple(ref.shape[:2]), kwargs, ref.device)


def _locate(state: _State, ids, shape: tuple, kwargs: dict, device) -> torch.Tensor | None:
    if not state.explicit:
        return forward_codes(kwargs, shape, device, state.first, state.last)
    for key, codes in state.explicit:
        if key is ids:
            return codes
    same = [c for _, c in state.explicit if tuple(c.shape) == shape]
    if len(same) == 1:  # the batch moved to another device (a reference copy): match by shape
        return same[0].to(device)
    raise TunelabError("loreft: a forward inside batch_context() does not belong to the batch; "
                       "cannot tell which prompt positions to intervene")


def _state(model: nn.Module) -> _State | None:
    for m in model.modules():
        st = m.__dict__.get("_tunelab_loreft")
        if st is not None:
            return st
    return None


@contextmanager
def batch_context(model: nn.Module, batch: dict):
    """The method's per-batch hook (`adapters.base.batch_context`, entered by `objectives.logprobs` around every
    scoring forward): inside the block, forwards on this batch's `input_ids` (or any `<prefix>input_ids` with its
    `<prefix>loss_mask`) intervene at each document's prompt positions (`<prefix>prompt_mask`, see
    loreft_positions.batch_codes). A no-op for models without LoReFT."""
    state = _state(model)
    if state is None:
        yield model
        return
    before, state.explicit = state.explicit, batch_codes(batch, state.first, state.last)
    try:
        yield model
    finally:
        state.explicit = before


def check_examples(examples) -> None:
    """Refuse encoded examples without a prompt span (plain text) before a run starts: nowhere to intervene."""
    for ex in examples:
        if ex.prompt_mask is not None and not any(ex.prompt_mask):
            raise TunelabError(f"{ex.origin or 'example'}: {NO_PROMPT}")


def wrap(model: nn.Module, cfg: LoreftConfig | dict | None = None) -> AdapterReport:
    """Freeze `model` and add LoReFT interventions to the chosen decoder blocks (see the module docstring)."""
    cfg = as_config(cfg, LoreftConfig)
    base.ensure_no_adapter(model, "loreft")
    stack_name = base.decoder_stack(model)
    if stack_name is None:
        raise TunelabError("loreft: the model has no decoder block list to intervene on")
    blocks = model.get_submodule(stack_name)
    n = len(blocks)
    ids = list(range(n)) if cfg.layers == "all" else list(dict.fromkeys(cfg.layers))
    bad = [i for i in ids if not -n <= i < n]
    if bad:
        raise TunelabError(f"loreft.layers: block {bad[0]} does not exist; the model has {n} (0..{n - 1})")
    ids = sorted({i % n for i in ids})
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d = int(text_cfg.hidden_size)
    weight = model.get_input_embeddings().weight
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(body, nn.Module) or body is model:
        raise TunelabError("loreft: cannot find the decoder body of the model (base_model_prefix)")
    base.freeze(model)
    state = _State(cfg.model_copy(update={"layers": ids}), ids, d)
    for i in ids:
        blocks[i].loreft = LoreftLayer(state, weight.device, adapter_dtype(weight))
        blocks[i].register_forward_hook(_block_hook)
    body.__dict__["_tunelab_loreft"] = state
    body.register_forward_pre_hook(_body_pre_hook, with_kwargs=True)
    trainable, total = base.count_parameters(model)
    per = 2 * cfg.r * d + cfg.r
    count = len(ids) * (1 if cfg.share_weights else (state.first > 0) + (state.last > 0))
    note = (f"positions f{state.first}+l{state.last} ({'shared' if cfg.share_weights else 'separate'} weights), "
            f"{count} interventions × (2·r·d + r = {per:,})")
    return AdapterReport(method="loreft", replaced=[f"{stack_name}.{i}" for i in ids], trainable=trainable,
                         total=total, notes=[note])


def merge(model: nn.Module) -> list[str]:
    raise TunelabError(NOT_MERGEABLE)


def export(model: nn.Module, cfg: LoreftConfig | dict | None, path: str | Path,
           base_model_name_or_path: str | None = None) -> Path:
    """Write the tunelab LoReFT format (PEFT has none; native_format.py writes the folder). Fields:

    * `tunelab_adapter.json`: the format header ({"format": "tunelab-adapter", "version": 1, "method": "loreft",
      "base_model_name_or_path"}) plus "config": the LoreftConfig with `layers` resolved to indices, "hidden_size";
    * `adapter_model.safetensors`: per intervention `<block path>.loreft.<prefix|suffix|shared>.` +
      `rotate` [r, d] (A; R = orthonormal_rows(A)), `learned_source.weight` [r, d] (W), `learned_source.bias`
      [r] (b), and the derived `R` [r, d] for readers (ignored on load; pyreft's rotate_layer.weight is Rᵀ).
    """
    state = _state(model)
    if state is None:
        raise TunelabError("export: the model has no LoReFT interventions; wrap it first")
    tensors = dict(adapter_state_dict(model))
    for name, module in base.adapter_modules(model):
        tensors[f"{name}.R"] = module.R.detach()
    fields = {"config": state.cfg.model_dump(mode="json", exclude={"init_from"}), "hidden_size": state.d}
    return save_native(path, "loreft", fields, tensors, base_model_name(model, base_model_name_or_path))


def load(model: nn.Module, path: str | Path) -> AdapterReport:
    """Wrap `model` with the LoReFT interventions `export` saved in folder `path`; outputs are identical."""
    meta, tensors = load_native(path, "loreft")
    try:
        report = wrap(model, LoreftConfig(**meta.get("config", {})))
    except TunelabError as e:
        raise TunelabError(f"{path}: {e}") from None
    sd = {k: t for k, t in tensors.items() if not k.endswith(DERIVED_SUFFIXES)}
    load_adapter_state_dict(model, sd, source=str(Path(path) / WEIGHTS_FILE))
    report.notes.append(f"loaded tunelab LoReFT adapter {path}")
    return report

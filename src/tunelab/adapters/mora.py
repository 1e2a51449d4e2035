"""MoRA: high-rank updating with one square matrix (Jiang et al. 2024, arXiv:2405.12130; reference code
github.com/kongds/MoRA, `peft-mora/src/peft/tuners/lora/layer.py`, `_apply_mora` and `get_delta_weight`).

A frozen linear layer W0 ∈ R^{out×in} gets an update through ONE trainable square matrix M ∈ R^{r̂×r̂}:

    y = W0 x + b + decompress(M · compress(x))          M = 0 at init, no alpha scaling

r̂ spends LoRA's parameter budget at rank r: r̂² ≈ r·(in + out), i.e. r̂ = floor(sqrt((in + out)·r) + 0.5),
rounded down to even for `rotation` (RoPE rotates coordinate pairs). 4096→4096 at r=8 gives r̂ = 256:
65,536 parameters, as LoRA's 8·(4096+4096), but ΔW can have rank up to 256 instead of 8.

compress: R^in → R^r̂ and decompress: R^r̂ → R^out are fixed (parameter-free) linear maps, so ΔW = D·M·C is a
plain matrix and merges like LoRA. Wherever a type needs more inputs than `in` (a multiple of r̂, or r̂ > in),
x is padded by *wrap-around*, x_pad[j] = x[j mod in] (the reference pads with x[:pad], same thing when pad ≤ in).
The types (reference numbers in brackets; the reference recommends 1 for large r, 6 for small r):

* `sharing` [1]   compress sums inputs with the same index mod r̂ (x_pad viewed as [n, r̂], summed over n);
                  decompress tiles: y[o] = z[o mod r̂]. So ΔW[o, j] = Σ M[o mod r̂, j' mod r̂] over copies j' of j.
* `group` [2]     contiguous groups: in (resp. out) is split into r̂ runs of near-equal length (the first
                  `in mod r̂` runs one longer); compress sums each run, decompress repeats z[k] over run k.
* `group_tile` [3]      group compress, tile decompress.
* `sharing_interleave` [4]  sharing compress, group (repeat-interleave) decompress.
* `rotation` [6]  x_pad is split into n blocks of r̂; block k is rotated RoPE-style (rotate-half pairs (j, j+r̂/2))
                  by angles k·θ_j, θ_j = 10000^(−2j/r̂); M is applied to every block, the n·r̂ outputs are
                  flattened and truncated to `out` (or tiled when n·r̂ < out). ΔW = [diag(M P_0, …, M P_{n−1})],
                  so blocks differ (P_0 = I) and ΔW is not just a repeated M.
* `reshape`       the same without rotation (the paper's "decouple"): block-diagonal diag(M, …, M).
* `truncation`    compress keeps x[:r̂]; decompress zero-pads z to `out` (the paper's weakest baseline).

Merging materialises ΔW by applying the update operator to the identity (columns ΔW[:, j] = op(e_j)), so the
merged weight is by construction the map the forward computed. There is no PEFT format for MoRA:
`export` writes the documented tunelab format (see `export`); `tunelab export --merged` gives a plain
HF model. M is fp32 on 16-bit bases, as LoRA's adapters.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from torch import nn

from ..errors import TunelabError
from . import base
from .base import (AdapterModule, AdapterReport, adapter_state_dict, disabled,  # noqa: F401 (re-exported)
                   load_adapter_state_dict, merge, set_enabled)
from .lora import adapter_dtype, as_config, inject
from .native_format import WEIGHTS_FILE, base_model_name, load_native, save_native

MoraType = Literal["sharing", "group", "group_tile", "sharing_interleave", "rotation", "reshape", "truncation"]
REFERENCE_TYPES = {1: "sharing", 2: "group", 3: "group_tile", 4: "sharing_interleave", 6: "rotation"}
# type -> (compress, decompress); "blocks" types apply M per block of r̂ inputs.
_PARTS = {"sharing": ("stride", "tile"), "group": ("group", "interleave"), "group_tile": ("group", "tile"),
          "sharing_interleave": ("stride", "interleave"), "truncation": ("truncate", "zeropad"),
          "rotation": ("blocks", "blocks"), "reshape": ("blocks", "blocks")}


class MoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(8, ge=1, description="LoRA rank budget; r̂ = round(sqrt((in+out)·r)) per module")
    type: MoraType = Field("rotation", description="compress/decompress operators (or reference number 1-4, 6)")
    r_hat: int | None = Field(None, ge=1, description="set r̂ directly for every module instead of from r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input only")
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or name patterns")
    modules_to_save: list[str] = Field(default_factory=list, description="modules trained fully")
    ensure_weight_tying: bool = Field(True, description="tied embed/lm_head extras stay one weight")
    rank_pattern: dict[str, PositiveInt] = Field(default_factory=dict, description="per-module r (PEFT-style keys)")
    init_from: str | None = Field(None, description="start from a saved MoRA adapter (a tunelab run folder or its "
                                  "adapter/ folder; same settings) loaded before step 0 (adapters/init_from.py)")

    @field_validator("type", mode="before")
    @classmethod
    def _reference_number(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            if value not in REFERENCE_TYPES:
                raise ValueError(f"reference MoRA type {value} is not implemented; use 1, 2, 3, 4 or 6")
            return REFERENCE_TYPES[value]
        return value


Config = MoraConfig


def mora_rank(d_in: int, d_out: int, r: int, kind: str = "sharing") -> int:
    """r̂ with r̂² ≈ r·(d_in + d_out): LoRA's parameter count at rank r (even for the rotation type)."""
    r_hat = int(math.sqrt((d_in + d_out) * r) + 0.5)
    if kind == "rotation":
        r_hat -= r_hat % 2
    return max(r_hat, 2 if kind == "rotation" else 1)


def _groups(n: int, r_hat: int) -> torch.Tensor:
    """Run index of each of n features split into r̂ contiguous runs, the first n mod r̂ runs one longer."""
    q, m = divmod(n, r_hat)
    j = torch.arange(n)
    big = m * (q + 1)  # features covered by the longer runs
    return torch.where(j < big, j // (q + 1), m + (j - big) // max(q, 1))


class MoraLinear(AdapterModule):
    """A linear layer with a MoRA update; holds the base layer's own `weight`/`bias` Parameters."""

    def __init__(self, linear: nn.Linear, r_hat: int, kind: str = "rotation", dropout: float = 0.0):
        super().__init__()
        if kind not in _PARTS:
            raise TunelabError(f"mora.type: unknown type '{kind}'; choose from {', '.join(_PARTS)}")
        if kind == "rotation" and r_hat % 2:
            raise TunelabError(f"mora: the rotation type needs an even r̂, got {r_hat}")
        object.__setattr__(self, "_base_layer", linear)  # for unwrap; kept out of the module tree (as LoRA)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.r_hat, self.kind = r_hat, kind
        dev = linear.weight.device
        self.mora_M = nn.Parameter(torch.zeros(r_hat, r_hat, device=dev, dtype=adapter_dtype(linear.weight)))
        self.mora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        comp, decomp = _PARTS[kind]
        self.n_blocks = -(-self.in_features // r_hat)  # blocks of r̂ in the wrap-padded input
        width = max(self.n_blocks * r_hat, r_hat)
        # Index maps are buffers (non-persistent: derived from shapes), so they follow .to(device).
        self.register_buffer("_pad_idx", torch.arange(self.in_features, width, device=dev) % self.in_features,
                             persistent=False)
        if comp == "group":
            self.register_buffer("_in_idx", _groups(self.in_features, r_hat).to(dev), persistent=False)
        span = self.n_blocks * r_hat if comp == "blocks" else r_hat
        if decomp == "interleave" and self.out_features >= r_hat:
            out_idx = _groups(self.out_features, r_hat)
        elif decomp == "zeropad":
            out_idx = torch.clamp(torch.arange(self.out_features), max=r_hat)  # index r̂ = an appended zero
        else:  # tile (or interleave with out < r̂: output o reads z[o]); blocks: truncate or tile the flat output
            out_idx = torch.arange(self.out_features) % span
        self.register_buffer("_out_idx", out_idx.to(dev), persistent=False)
        if kind == "rotation":
            theta = 10000.0 ** (-torch.arange(0, r_hat, 2, dtype=torch.float64) / r_hat)  # θ_j, j < r̂/2
            angles = torch.outer(torch.arange(self.n_blocks, dtype=torch.float64), theta)  # k·θ_j
            angles = torch.cat([angles, angles], dim=-1)  # coordinate j and j + r̂/2 share an angle
            self.register_buffer("_cos", angles.cos().float().to(dev), persistent=False)
            self.register_buffer("_sin", angles.sin().float().to(dev), persistent=False)

    # -- the update operator ------------------------------------------------------------------------
    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.index_select(-1, self._pad_idx)], dim=-1) if self._pad_idx.numel() else x

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """R^in → R^r̂ ([..., r̂]); for block types R^in → [..., n_blocks, r̂], rotated for `rotation`."""
        comp = _PARTS[self.kind][0]
        r_hat = self.r_hat
        if comp == "group":
            return x.new_zeros(*x.shape[:-1], r_hat).index_add(-1, self._in_idx, x)
        if comp == "truncate":
            return (x if x.shape[-1] >= r_hat else self._padded(x))[..., :r_hat]
        xp = self._padded(x)
        blocks = xp.reshape(*x.shape[:-1], -1, r_hat)
        if comp == "stride":
            return blocks.sum(dim=-2)
        if self.kind == "rotation":
            half = r_hat // 2
            rotated_half = torch.cat([-blocks[..., half:], blocks[..., :half]], dim=-1)
            blocks = blocks * self._cos.to(x.dtype) + rotated_half * self._sin.to(x.dtype)
        return blocks

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        decomp = _PARTS[self.kind][1]
        if decomp == "blocks":
            z = z.flatten(-2)
        elif decomp == "zeropad":
            z = F.pad(z, (0, 1))
        return z.index_select(-1, self._out_idx)

    def mora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """decompress(M · compress(x)) in the adapter dtype (no scaling: MoRA has no alpha)."""
        x = self.mora_dropout(x.to(self.mora_M.dtype))
        return self.decompress(self.compress(x) @ self.mora_M.T)

    # -- base path ------------------------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if not self.adapter_enabled:
            return y
        return (y + self.mora_forward(x)).to(y.dtype)

    def delta_weight(self, chunk: int = 2048) -> torch.Tensor:
        """ΔW [out, in] (adapter dtype): the operator applied to the identity, chunked over input columns so a
        14336-wide layer never holds a full in×in identity. Differentiable in M; dropout is not applied."""
        cols = []
        for start in range(0, self.in_features, chunk):
            n = min(chunk, self.in_features - start)
            eye = torch.zeros(n, self.in_features, device=self.mora_M.device, dtype=self.mora_M.dtype)
            eye[torch.arange(n), torch.arange(start, start + n)] = 1.0
            cols.append(self.decompress(self.compress(eye) @ self.mora_M.T))  # row j = ΔW e_j
        return torch.cat(cols, dim=0).T

    def merged_weight(self) -> torch.Tensor:
        w0 = self.weight
        return (w0.float() + self.delta_weight().float()).to(w0.dtype)

    def linear_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.adapter_enabled:
            return self.weight, self.bias
        return (self.weight + self.delta_weight()).to(self.weight.dtype), self.bias

    def adapter_parameter_names(self) -> list[str]:
        return ["mora_M"]

    def unwrap(self, in_place: bool = True) -> nn.Module:
        linear = self._base_layer
        with torch.no_grad():
            merged = self.merged_weight()
            if in_place:
                self.weight.copy_(merged)
                weight = self.weight
            else:  # shared (tied) weight: the merged module gets its own
                weight = nn.Parameter(merged, requires_grad=self.weight.requires_grad)
        linear.weight, linear.bias = weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mora type={self.kind}, r_hat={self.r_hat}")


def wrap(model: nn.Module, cfg: MoraConfig | dict | None = None, r_hats: dict[str, int] | None = None
         ) -> AdapterReport:
    """Add MoRA to the modules `cfg.target_modules` selects; freeze the rest of the model.

    `r_hats` (module name -> r̂) overrides the budget rule per module; `load` uses it to rebuild exactly
    the shapes that were saved."""
    cfg = as_config(cfg, MoraConfig)
    r_hats = r_hats or {}

    def make(module: nn.Module, name: str, r: int, _alpha: float) -> MoraLinear:
        r_hat = r_hats.get(name) or cfg.r_hat or mora_rank(module.in_features, module.out_features, r, cfg.type)
        return MoraLinear(module, r_hat, cfg.type, cfg.dropout)

    # inject() reads LoRA's alpha fields; MoRA has no alpha, so give it neutral ones.
    shim = SimpleNamespace(**{k: getattr(cfg, k) for k in MoraConfig.model_fields}, alpha=1.0, alpha_pattern={})
    report = inject(model, shim, method="mora", make_layer=make)
    layers = [m for _, m in base.adapter_modules(model) if isinstance(m, MoraLinear)]
    if layers:
        report.notes.append(f"mora type {cfg.type}, r̂ {min(m.r_hat for m in layers)}-{max(m.r_hat for m in layers)}")
    return report


def export(model: nn.Module, cfg: MoraConfig | dict | None, path: str | Path,
           base_model_name_or_path: str | None = None) -> Path:
    """Write the tunelab MoRA format (PEFT has none; native_format.py writes the folder). Fields:

    * `tunelab_adapter.json`: the format header ({"format": "tunelab-adapter", "version": 1, "method": "mora",
      "base_model_name_or_path"}) plus "config": the MoraConfig, "modules": {module path: {"r_hat", "type",
      "in_features", "out_features"}}, "modules_to_save": [module paths trained fully];
    * `adapter_model.safetensors`: `<module path>.mora_M` [r̂, r̂] per adapted module, plus the full tensors of
      modules trained fully (`lm_head.weight`; a tied pair once, under the first name in model order).
    """
    cfg = as_config(cfg, MoraConfig)
    layers = {n: m for n, m in base.adapter_modules(model) if isinstance(m, MoraLinear)}
    if not layers:
        raise TunelabError("export: the model has no MoRA layers; wrap it first")
    extras = [n for n, m in base.adapter_modules(model) if n not in layers]
    fields = {"config": cfg.model_dump(mode="json", exclude={"init_from"}),
              "modules": {n: {"r_hat": m.r_hat, "type": m.kind, "in_features": m.in_features,
                              "out_features": m.out_features} for n, m in layers.items()},
              "modules_to_save": extras}
    return save_native(path, "mora", fields, adapter_state_dict(model),
                       base_model_name(model, base_model_name_or_path))


def load(model: nn.Module, path: str | Path) -> AdapterReport:
    """Wrap `model` with the MoRA adapter `export` saved in folder `path`; outputs are identical."""
    meta, tensors = load_native(path, "mora")
    modules = meta.get("modules") or {}
    cfg = MoraConfig(**{**meta.get("config", {}), "target_modules": sorted(modules),
                        "modules_to_save": list(meta.get("modules_to_save") or [])})
    kinds = {v.get("type", cfg.type) for v in modules.values()}
    if len(kinds) > 1:
        raise TunelabError(f"{path}: mixed MoRA types {sorted(kinds)} are not supported")
    try:
        report = wrap(model, cfg, r_hats={n: int(v["r_hat"]) for n, v in modules.items()})
    except TunelabError as e:
        raise TunelabError(f"{path}: {e}") from None
    load_adapter_state_dict(model, tensors, source=str(Path(path) / WEIGHTS_FILE))
    report.notes.append(f"loaded tunelab MoRA adapter {path}")
    return report

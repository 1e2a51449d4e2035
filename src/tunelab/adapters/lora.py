"""LoRA (Hu et al. 2021, arXiv:2106.09685) and rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).

A frozen linear layer y = W0 x + b gets a trainable low-rank update:

    y = W0 x + b + s · B A dropout(x)        A ∈ R^{r×in}, B ∈ R^{out×r}
    s = alpha / r          (LoRA)
    s = alpha / sqrt(r)    (rsLoRA: keeps the update's scale stable as r grows, so large ranks learn)

Init as PEFT: A ~ Kaiming-uniform(a=√5) (nn.Linear's default), B = 0, so ΔW = s·BA = 0 and the wrapped
model starts exactly equal to the base. Merging folds the update into the weight: W ← W0 + s·BA, after
which the layer is a plain `nn.Linear` again and `model.save_pretrained` writes an ordinary HF model.

Layout, chosen so keys map 1:1 to PEFT (prefix `base_model.model.`, adapter name dropped):

    <path>.weight, <path>.bias      the base Parameters, adopted (same objects, same keys as before)
    <path>.lora_A.weight  [r, in]   nn.Linear(in, r, bias=False)
    <path>.lora_B.weight  [out, r]  nn.Linear(r, out, bias=False)

Adapter weights are fp32 when the base is 16-bit (PEFT's `autocast_adapter_dtype`): the update is small
relative to W0 and bf16 would round much of it away. The input is cast to the adapter dtype for the low-rank
path and the sum is cast back to the base output dtype.

Extension points for later methods: `base_forward`/`base_weight` (QLoRA: dequantize an NF4 weight on the
fly), `merged_weight` and `forward` (DoRA: magnitude vector, rescaled output), and `inject(...,
make_layer=...)` to reuse target matching, freezing, extras and the report with another layer class.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator
from torch import nn

from ..errors import TunelabError
from . import base, extras
from .base import (AdapterModule, AdapterReport, adapter_state_dict, disabled,  # noqa: F401 (re-exported)
                   load_adapter_state_dict, merge, set_enabled)


class LoraConfig(BaseModel):
    """LoRA settings. Field names follow tunelab's config; `peft_format` maps them to PEFT's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: s = alpha/r (rsLoRA: alpha/sqrt(r))")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input only")
    use_rslora: bool = False
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or name patterns")
    modules_to_save: list[str] = Field(default_factory=list, description="modules trained fully")
    ensure_weight_tying: bool = Field(True, description="tied embed/lm_head extras stay one weight")
    rank_pattern: dict[str, PositiveInt] = Field(default_factory=dict, description="per-module r (PEFT semantics)")
    alpha_pattern: dict[str, PositiveFloat] = Field(default_factory=dict, description="per-module alpha")
    init_from: str | None = Field(None, description="start from a saved adapter instead of B=0: a tunelab run folder, "
                                  "its adapter/ folder or a PEFT adapter folder (same r, alpha and targets); "
                                  "loaded before step 0, the optimizer starts fresh (adapters/init_from.py)")

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _keys_are_regexes(cls, value: dict) -> dict:
        for key in value:
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"key '{key}' is not a valid regex ({e})") from None
        return value


Config = LoraConfig
# Per-layer tensor names in PEFT files this method reads and writes (`peft_format` checks imports against it).
PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight")


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # fp32 adapters on 16-bit or quantized (integer-stored) bases; otherwise follow the base.
    if not weight.is_floating_point() or weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype


class LoraLinear(AdapterModule):
    """A linear layer with a LoRA update; holds the base layer's own `weight`/`bias` Parameters."""

    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        # The original module stays reachable for `unwrap` (keeps its class, hooks and attributes) but is
        # kept out of the module tree so its weight is not registered twice.
        object.__setattr__(self, "_base_layer", linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)  # None stays a registered None, like nn.Linear
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        kw = dict(bias=False, device=linear.weight.device, dtype=adapter_dtype(linear.weight))
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # -- base path (QLoRA overrides these two) --------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        return self.weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    # -- adapter path ---------------------------------------------------------------------------------
    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if not self.adapter_enabled:
            return y
        if y.dtype == self.lora_B.weight.dtype and x.dtype == y.dtype:
            # y + s·(A x) Bᵀ as one addmm: no separate [tokens, out] scale and add passes, forward or backward
            # (benchmarks/ab.py lora-addmm); the same sum, rounded once less.
            a = self.lora_A(self.lora_dropout(x))
            return torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1]), self.lora_B.weight.t(),
                               alpha=self.scaling).view(y.shape)
        # Same order as PEFT (add, then cast) so bf16 results match it too, not only fp32.
        return (y + self.lora_forward(x)).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, shape [out, in], in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W0 + ΔW, summed in fp32 and returned in the base dtype (DoRA overrides)."""
        w0 = self.base_weight()
        return (w0.float() + self.delta_weight().float()).to(w0.dtype)

    def linear_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Weight-space form of forward(): W0 + s·BA (differentiable in A and B); dropout cannot be folded.
        w0 = self.base_weight()
        if not self.adapter_enabled:
            return w0, self.bias
        return (w0 + self.delta_weight()).to(w0.dtype), self.bias

    def adapter_parameter_names(self) -> list[str]:
        return list(PEFT_SUFFIXES)

    def unwrap(self, in_place: bool = True) -> nn.Module:
        linear = self._base_layer
        with torch.no_grad():
            merged = self.merged_weight()
            if in_place and merged.dtype == self.weight.dtype:
                self.weight.copy_(merged)  # keep the Parameter object (and its memory)
                weight = self.weight
            else:
                weight = nn.Parameter(merged, requires_grad=self.weight.requires_grad)
        linear.weight = weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        kind = "rslora" if self.use_rslora else "lora"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind} r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:.4g}")


def as_config(cfg, cls=LoraConfig):
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, dict):
        return cls(**cfg)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(cfg).__name__}")


def _moe_note(model: nn.Module, extras_names: list[str]) -> list[str]:
    # Fused MoE experts (transformers >= 5) keep 3D Parameters, not nn.Linear: say so instead of
    # silently training attention only.
    fused = [n for n, m in model.named_modules() if n.rpartition(".")[2] == "experts"
             and any(p is not None and p.dim() == 3 for p in m._parameters.values())]
    if fused and not any(n in extras_names for n in fused):
        return [f"{len(fused)} fused MoE expert blocks ({fused[0]}, ...) hold 3D weights LoRA cannot wrap; "
                "they stay frozen (add 'experts' to modules_to_save to train them fully)"]
    return []


MakeLayer = Callable[[nn.Module, str, int, float], nn.Module]


def inject(model: nn.Module, cfg: LoraConfig, *, method: str, make_layer: MakeLayer,
           kinds: tuple[type, ...] = (nn.Linear,)) -> AdapterReport:
    """Shared body of `wrap` for LoRA-family methods.

    Resolves targets and extras on the pristine model, freezes everything, replaces each target with
    `make_layer(module, name, r, alpha)` (r/alpha after `rank_pattern`/`alpha_pattern`), wraps the extras
    and reports. Modules named in modules_to_save are trained fully and therefore not targeted (as PEFT).
    """
    base.ensure_no_adapter(model, method)
    targets = base.match_modules(model, cfg.target_modules, what=f"{method}.target_modules", kinds=kinds)
    extra_names = extras.resolve(model, cfg.modules_to_save, what=f"{method}.modules_to_save",
                                 keep_tied=cfg.ensure_weight_tying)
    targets = [t for t in targets if t not in set(extra_names)]
    if not targets and not extra_names:
        raise TunelabError(f"{method}.target_modules: every match is also in modules_to_save; nothing to adapt")
    base.freeze(model)
    for name in targets:
        r = int(base.pattern_value(cfg.rank_pattern, name, cfg.r))
        alpha = float(base.pattern_value(cfg.alpha_pattern, name, cfg.alpha))
        base.replace_module(model, name, make_layer(model.get_submodule(name), name, r, alpha))
    tied = extras.wrap(model, extra_names, keep_tied=cfg.ensure_weight_tying)
    trainable, total = base.count_parameters(model)
    return AdapterReport(method=method, replaced=targets, trainable=trainable, total=total,
                         extras=extra_names, tied=tied, notes=_moe_note(model, extra_names))


def wrap(model: nn.Module, cfg: LoraConfig | dict | None = None) -> AdapterReport:
    """Add LoRA (or rsLoRA) to the modules `cfg.target_modules` selects; freeze the rest of the model."""
    cfg = as_config(cfg)
    return inject(model, cfg, method="lora",
                  make_layer=lambda m, _n, r, a: LoraLinear(m, r, a, cfg.dropout, cfg.use_rslora))


def export(model: nn.Module, cfg: LoraConfig | dict | None, path: str | Path,
           base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` loadable by `PeftModel.from_pretrained`.

    `cfg` (optional) names the default r/alpha; everything else is read off the built layers."""
    from .peft_format import save_peft

    cfg = None if cfg is None else as_config(cfg)
    return save_peft(model, cfg, path, base_model_name_or_path=base_model_name_or_path)


def load(model: nn.Module, path: str | Path) -> AdapterReport:
    """Wrap `model` with the PEFT LoRA adapter stored in folder `path` (safetensors only). A DoRA adapter
    (`use_dora: true`) is dispatched to the dora method."""
    from .peft_format import load_peft as _load

    return _load(model, path)

"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv:2402.09353).

The adapted weight is split into a magnitude and a direction; LoRA updates the direction, and a trainable
vector m sets each output unit's magnitude:

    W' = m ⊙ (W0 + s·B A) / n,     n = ‖W0 + s·B A‖ per output row (PyTorch's [out, in] layout: norm over dim 1)
    m  ∈ R^{out}, initialised to the row norms ‖W0‖, so with B = 0 the layer starts exactly equal to the base

Following the paper (§4.3) and PEFT, n is treated as a constant: it is recomputed every forward but detached,
so no gradient flows through the norm (this saves the memory of differentiating through W0 + s·BA).

Forward without materialising W' in a matmul (n does need the rows of W0 + s·BA, computed without a graph):

    y = (m / n) ⊙ (W0 x + s·B A x) + b

With dropout p > 0 in training, dropout applies to the adapter input only, exactly as in PEFT:

    y = W0 x + b + (m/n − 1) ⊙ W0 x̃ + (m/n) ⊙ s·B A x̃,     x̃ = dropout(x)

Merge: W ← (m / n) ⊙ (W0 + s·B A), computed in fp32 and stored in the base dtype; the layer becomes a plain
nn.Linear again. Export: a PEFT LoRA adapter with `use_dora: true`; each layer adds the tensor
`<path>.lora_magnitude_vector` [out] (PEFT's key), which PEFT loads with identical outputs.
The magnitude vector is fp32 on 16-bit bases, like lora_A/lora_B.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import (AdapterReport, adapter_state_dict, disabled,  # noqa: F401 (re-exported interface)
                   load_adapter_state_dict, merge, set_enabled)
from .lora import LoraConfig, LoraLinear, as_config, inject


class DoraConfig(LoraConfig):
    """DoRA settings: exactly LoRA's (r, alpha, dropout, use_rslora, targets, patterns, extras)."""


Config = DoraConfig
PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


class DoraLinear(LoraLinear):
    """A LoRA layer whose output rows are rescaled to a learned magnitude (see the module docstring)."""

    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__(linear, r, alpha, dropout, use_rslora)
        self.lora_magnitude_vector = nn.Parameter(
            torch.empty(self.out_features, device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype))
        self.reset_magnitude()

    def reset_magnitude(self) -> None:
        """m ← ‖W0 + s·BA‖ rows (= ‖W0‖ at init, B = 0), so the wrapped layer starts equal to its base."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm())

    # The base path without bias: DoRA rescales W0·x, and the bias must stay outside the rescaling.
    def base_forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        return F.linear(x, self.base_weight(), self.bias if with_bias else None)

    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·BA‖ over dim 1, in the adapter dtype, detached (no graph is built for it).

        Outside training n is cached, because generation runs every layer once per token and n costs as much
        as the matmul. The cache key is each tensor's storage and version counter, so any in-place update
        (optimizer step, loading weights) or move to another device recomputes it."""
        key = None
        if not self.training:
            key = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
            cached = self.__dict__.get("_norm_cache")
            if cached is not None and cached[0] == key:
                return cached[1]
        with torch.no_grad():
            dtype = self.lora_A.weight.dtype
            w = self.base_weight().to(dtype) + self.delta_weight()
            n = torch.linalg.vector_norm(w, dim=1)
        if key is not None:
            self.__dict__["_norm_cache"] = (key, n)  # a plain attribute: never in the state dict
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base_forward(x)
        dtype = self.lora_A.weight.dtype
        scale = self.lora_magnitude_vector / self.weight_norm()  # m / n: the gradient reaches m only
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            # PEFT's form under dropout: the full base output plus the rescaling of the dropped path.
            dropped = self.lora_dropout(x)
            y = self.base_forward(x)
            lora = self.lora_B(self.lora_A(dropped.to(dtype))) * self.scaling
            return (y + (scale - 1) * self.base_forward(dropped, with_bias=False) + scale * lora).to(y.dtype)
        base = self.base_forward(x, with_bias=False)
        lora = self.lora_B(self.lora_A(x.to(dtype))) * self.scaling
        y = scale * (base.to(dtype) + lora)
        if self.bias is not None:
            y = y + self.bias
        return y.to(base.dtype)  # sums in the adapter dtype (fp32 on 16-bit bases), one rounding at the end

    def merged_weight(self) -> torch.Tensor:
        """(m/n) ⊙ (W0 + s·BA), in fp32, returned in the base dtype."""
        w0 = self.base_weight()
        with torch.no_grad():
            w = w0.float() + self.delta_weight().float()
            scale = self.lora_magnitude_vector.float() / torch.linalg.vector_norm(w, dim=1)
            return (scale.unsqueeze(1) * w).to(w0.dtype)

    def linear_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # W' as a differentiable function of m, A and B (n detached, as in forward); dropout cannot be folded.
        w0 = self.base_weight()
        if not self.adapter_enabled:
            return w0, self.bias
        dtype = self.lora_A.weight.dtype
        scale = self.lora_magnitude_vector / self.weight_norm()
        w = scale.unsqueeze(1) * (w0.to(dtype) + self.delta_weight())
        return w.to(w0.dtype), self.bias

    def adapter_parameter_names(self) -> list[str]:
        return list(PEFT_SUFFIXES)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"


def wrap(model: nn.Module, cfg: DoraConfig | dict | None = None) -> AdapterReport:
    """Add DoRA to the modules `cfg.target_modules` selects; freeze the rest of the model."""
    cfg = as_config(cfg, DoraConfig)
    return inject(model, cfg, method="dora",
                  make_layer=lambda m, _n, r, a: DoraLinear(m, r, a, cfg.dropout, cfg.use_rslora))


def export(model: nn.Module, cfg: DoraConfig | dict | None, path: str | Path,
           base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA adapter with `use_dora: true` (config + safetensors incl. magnitude vectors)."""
    from .peft_format import save_peft

    cfg = None if cfg is None else as_config(cfg, DoraConfig)
    return save_peft(model, cfg, path, base_model_name_or_path=base_model_name_or_path,
                     overrides={"use_dora": True})


def load(model: nn.Module, path: str | Path) -> AdapterReport:
    """Wrap `model` with the PEFT adapter in folder `path` (`use_dora: true` ones come back as DoRA)."""
    from .peft_format import load_peft as _load

    return _load(model, path)

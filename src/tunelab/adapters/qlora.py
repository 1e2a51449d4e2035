"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LoRA — or DoRA ("QDoRA") — on an NF4-quantised base.

Each targeted linear layer keeps its base weight only as 4-bit NF4 codes (see `nf4.py`: blocks of 64, absmax
scaling, optional double quantisation of the absmax values) and dequantises it on the fly, in the compute
dtype, every forward and again in the backward pass:

    y = dequant(W_nf4) x + b + s · B A dropout(x)                         (LoRA on top; DoRA: see dora.py)

The matmul runs in the compute dtype; each layer returns its input's dtype, like the nn.Linear it replaces
(and bitsandbytes' Linear4bit), so a compute dtype other than the model's changes rounding, not dtypes.

The backward pass needs W only to propagate gradients to x (W is frozen), so a custom autograd function
re-dequantises W there instead of saving a float copy per layer: activations are all that training keeps.
On CUDA, bitsandbytes' fused kernel does the dequantisation when installed; otherwise (and on CPU) the
pure-PyTorch path in `nf4.py` does, with identical results.

Which weights are quantised: the targeted linear layers. With the default `target_modules: all-linear` that is
every linear layer of the decoder stack, as in the paper; embeddings, norms, `lm_head`, MoE routers and fused
3D MoE experts stay in float. A weight tied to another module (e.g. a tied `lm_head`) is refused: quantising
one side would silently untie it.

State-dict keys of a quantised layer `<path>` (buffers, on the model's device):

    <path>.weight_nf4            uint8 [n/2]      two 4-bit codes per byte (high nibble first)
    <path>.weight_absmax         fp32  [n/64]     without double quantisation, or with it:
    <path>.weight_absmax_q       int8  [n/64]     ·  <path>.weight_absmax_scale fp32 [n/64/256]
    <path>.weight_absmax_mean    fp32  []
    <path>.bias (float, frozen), <path>.lora_A.weight, <path>.lora_B.weight (+ .lora_magnitude_vector for QDoRA)

`<path>.weight` no longer exists while the adapter is on. Checkpoints hold only the trainable tensors; the
quantised buffers are rebuilt by quantising the base model again on load (quantisation is deterministic).

Merge: W ← dequant(W_nf4) (+ the LoRA/DoRA update), computed in fp32 and stored in the dtype the base weight
had before quantisation; the layer becomes a plain nn.Linear. The merged model therefore equals the
quantised model that was trained, not the original float model.

Export: a PEFT LoRA adapter (`use_dora: true` for QDoRA) whose base model is the original float model, plus
`tunelab_quant.json` with the quantisation settings. Note that the adapter was trained against the
NF4-quantised base: applied to the float base (as PEFT does by default) its outputs differ by the
quantisation error; `load` here re-quantises the base first and reproduces the trained model exactly.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..errors import TunelabError
from . import base, nf4
from .base import (AdapterReport, adapter_state_dict, disabled,  # noqa: F401 (re-exported interface)
                   load_adapter_state_dict, merge, set_enabled)
from .dora import DoraLinear
from .lora import LoraConfig, LoraLinear, as_config, inject

QUANT_FILE = "tunelab_quant.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QLoraConfig(LoraConfig):
    """QLoRA settings: LoRA's, plus how the base is quantised and whether DoRA runs on top."""

    use_dora: bool = Field(False, description="QDoRA: DoRA instead of LoRA on the NF4 base")
    block_size: int = Field(nf4.BLOCK_SIZE, ge=2, le=4096, description="weights per absmax block")
    double_quant: bool = Field(True, description="quantise the absmax values too (8-bit, blocks of 256)")
    double_quant_block_size: int = Field(nf4.DQ_BLOCK_SIZE, ge=2, le=4096)
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype weights are dequantised into; auto = the base weight's dtype")

    @field_validator("block_size")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (two 4-bit codes share a byte)")
        return v


Config = QLoraConfig
PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
QUANT_KEYS = ("nf4", "absmax", "absmax_q", "absmax_scale", "absmax_mean")


class NF4Matmul(torch.autograd.Function):
    """y = x Wᵀ + b with W = `source.base_weight()` dequantised in forward and again in backward, never saved
    (QLoRA's memory win). `source`: a QLoRA layer, or a fused group of them (adapters/fused.py)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return F.linear(x, layer.base_weight(), bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.base_weight().to(grad.dtype)
        if ctx.needs_input_grad[1]:  # only if someone unfroze the bias
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_b, None


class _NF4Base:
    """Mixin that swaps a LoRA-family layer's float base weight for NF4 buffers (MRO: before the layer)."""

    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float, use_rslora: bool,
                 quant: QLoraConfig, quantize_from: torch.dtype | None = None):
        super().__init__(linear, r, alpha, dropout, use_rslora)
        w = self.weight
        self.weight_shape = tuple(w.shape)
        self.base_dtype = w.dtype
        self.compute_dtype = _DTYPES.get(quant.compute_dtype, w.dtype)
        self.block_size, self.dq_block_size = quant.block_size, quant.double_quant_block_size
        # Loading a run quantises from the dtype training did (bf16 on GPU, fp32 on CPU), so the codes and
        # absmax values are the ones the adapter was trained against, whatever dtype the base loads in now.
        self.quantized_from = quantize_from or w.dtype
        state = nf4.quantize(w.to(self.quantized_from), quant.block_size, quant.double_quant,
                             quant.double_quant_block_size)
        # Drop every reference to the float weight so its memory is freed; unwrap() creates the merged one.
        del self.weight
        linear.weight = None
        for key, t in state.items():
            self.register_buffer(f"weight_{key}", t)

    @property
    def double_quant(self) -> bool:
        return "weight_absmax_q" in self._buffers

    def quant_state(self) -> dict[str, torch.Tensor]:
        return {k: self._buffers[f"weight_{k}"] for k in QUANT_KEYS if f"weight_{k}" in self._buffers}

    def quantized_bytes(self) -> int:
        return nf4.storage_bytes(self.quant_state())

    def base_weight(self) -> torch.Tensor:
        if "weight" in self._parameters:  # during the layer's own __init__ (DoRA's m0), before quantisation
            return self._parameters["weight"]
        return nf4.dequantize(self.quant_state(), self.weight_shape, self.compute_dtype,
                              self.block_size, self.dq_block_size)

    def base_forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        # The matmul runs in the compute dtype, but the result comes back in the input's dtype (as
        # bitsandbytes' Linear4bit does): the layer stays a drop-in nn.Linear whatever compute_dtype is.
        # Returning the compute dtype instead breaks models that mix the outputs of several linears with
        # other tensors, e.g. bf16 q/k upcast by fp32 rotary cos/sin next to a bf16 v in attention.
        bias = self.bias.to(self.compute_dtype) if with_bias and self.bias is not None else None
        return NF4Matmul.apply(x.to(self.compute_dtype), bias, self).to(x.dtype)

    @contextmanager
    def _fp32_base(self):
        # Merge from an fp32 dequantisation so a 16-bit compute dtype adds no rounding before the final cast.
        saved, self.compute_dtype = self.compute_dtype, torch.float32
        try:
            yield
        finally:
            self.compute_dtype = saved

    def unwrap(self, in_place: bool = True) -> nn.Module:
        # in_place is moot: tied weights are refused at wrap time, so nothing else shares this weight.
        linear = self._base_layer
        with torch.no_grad(), self._fp32_base():
            merged = self.merged_weight().to(self.base_dtype)
        linear.weight = nn.Parameter(merged, requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        dq = ", double-quant" if self.double_quant else ""
        return (super().extra_repr() + f", nf4 block={self.block_size}{dq}, "
                f"compute={str(self.compute_dtype).removeprefix('torch.')}")


class QLoraLinear(_NF4Base, LoraLinear):
    """LoRA on an NF4 base weight."""


class QDoraLinear(_NF4Base, DoraLinear):
    """DoRA on an NF4 base weight ("QDoRA")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reset_magnitude()  # m0 = row norms of the *dequantised* W0: the layer starts equal to its NF4 base


def _shared_weights(model: nn.Module, names: list[str]) -> list[str]:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return [n for n in names if counts.get(id(model.get_submodule(n).weight), 0) > 1]


def _finish(model: nn.Module, report: AdapterReport) -> AdapterReport:
    """Count the quantised weights in the report's total (they are buffers, not Parameters) and say so."""
    layers = [m for _, m in base.adapter_modules(model) if isinstance(m, _NF4Base)]
    n = sum(math.prod(m.weight_shape) for m in layers)
    q_bytes = sum(m.quantized_bytes() for m in layers)
    report.method = "qlora"
    report.total += n
    if layers:
        kind = "QDoRA" if isinstance(layers[0], DoraLinear) else "LoRA"
        report.notes.append(f"{len(layers)} linear weights in NF4 ({kind} on top): {q_bytes / 2**20:.1f} MiB "
                            f"instead of {2 * n / 2**20:.1f} MiB in fp16")
    return report


def wrap(model: nn.Module, cfg: QLoraConfig | dict | None = None) -> AdapterReport:
    """Quantise the targeted linear weights to NF4 and add LoRA (or DoRA with `use_dora`); freeze the rest."""
    cfg = as_config(cfg, QLoraConfig)
    base.ensure_no_adapter(model, "qlora")
    targets = base.match_modules(model, cfg.target_modules, what="qlora.target_modules")
    tied = _shared_weights(model, targets)
    if tied:
        raise TunelabError(f"qlora.target_modules: {tied[0]} shares its weight with another module (tied "
                           "embeddings); quantising it would untie them, so leave it out of target_modules")
    cls = QDoraLinear if cfg.use_dora else QLoraLinear
    report = inject(model, cfg, method="qlora",
                    make_layer=lambda m, _n, r, a: cls(m, r, a, cfg.dropout, cfg.use_rslora, cfg))
    return _finish(model, report)


def _quant_settings(layers: list[_NF4Base], cfg: QLoraConfig | None) -> dict:
    first = layers[0]
    return {"quantization": "nf4", "block_size": first.block_size, "double_quant": first.double_quant,
            "double_quant_block_size": first.dq_block_size,
            "compute_dtype": cfg.compute_dtype if cfg is not None else "auto",
            "quantized_from_dtype": str(first.quantized_from).removeprefix("torch."),
            "note": "trained against the NF4-quantised base model; tunelab re-quantises the base on load"}


def export(model: nn.Module, cfg: QLoraConfig | dict | None, path: str | Path,
           base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA adapter (QDoRA: `use_dora: true`) for the float base, plus `tunelab_quant.json`."""
    from .peft_format import save_peft

    cfg = None if cfg is None else as_config(cfg, QLoraConfig)
    layers = [m for _, m in base.adapter_modules(model) if isinstance(m, _NF4Base)]
    if not layers:
        raise TunelabError("qlora export: the model has no quantised LoRA layers; wrap it first")
    use_dora = isinstance(layers[0], DoraLinear)
    out = save_peft(model, cfg, path, base_model_name_or_path=base_model_name_or_path,
                    overrides={"use_dora": use_dora})
    (out / QUANT_FILE).write_text(json.dumps(_quant_settings(layers, cfg), indent=2) + "\n")
    return out


def load(model: nn.Module, path: str | Path) -> AdapterReport:
    """Wrap the float `model` with the adapter in `path`, quantising each adapted base weight to NF4.

    Settings come from `tunelab_quant.json` when present (QLoRA's defaults otherwise, e.g. for an adapter
    trained elsewhere on a bitsandbytes NF4 base). The adapter is loaded by the LoRA/DoRA reader onto the float
    layers, then each layer is rebuilt around its quantised weight, keeping the loaded adapter tensors."""
    from .peft_format import load_peft as _load

    path = Path(path)
    settings = json.loads((path / QUANT_FILE).read_text()) if (path / QUANT_FILE).is_file() else {}
    known = {k: settings[k] for k in ("block_size", "double_quant", "double_quant_block_size", "compute_dtype")
             if k in settings}
    try:
        quant = QLoraConfig(**known)
    except ValueError as e:
        raise TunelabError(f"{path / QUANT_FILE}: invalid quantisation settings ({e})") from None
    report = _load(model, path)
    names = [n for n, m in base.adapter_modules(model) if isinstance(m, LoraLinear)]
    tied = _shared_weights(model, names)
    if tied:
        raise TunelabError(f"{path}: {tied[0]} shares its weight with another module; it cannot be quantised")
    source = _DTYPES.get(settings.get("quantized_from_dtype"))
    for name in names:
        old = model.get_submodule(name)
        cls = QDoraLinear if isinstance(old, DoraLinear) else QLoraLinear
        p = float(getattr(old.lora_dropout, "p", 0.0))
        new = cls(old._base_layer, old.r, old.alpha, p, old.use_rslora, quant, quantize_from=source)
        new.lora_A, new.lora_B = old.lora_A, old.lora_B  # the loaded adapter tensors, moved over as they are
        if isinstance(old, DoraLinear):
            new.lora_magnitude_vector = old.lora_magnitude_vector
        new.adapter_enabled = old.adapter_enabled
        base.replace_module(model, name, new)
    return _finish(model, report)

"""NF4 ("4-bit NormalFloat") block quantisation with optional double quantisation, in pure PyTorch.

Reference: Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"
(arXiv:2305.14314) §3; code values and byte layout as bitsandbytes' `quantize_4bit(quant_type="nf4")`.

Quantise a weight W (flattened row-major, zero-padded to a multiple of the block size B = 64):

    c_b   = max_{i∈b} |w_i|                          absmax of block b (fp32, one per 64 weights)
    q_i   = argmin_k |w_i / c_b − NF4[k]|            nearest of the 16 NF4 code values (4 bits)
    byte  = q_{2j} << 4 | q_{2j+1}                   two codes per uint8, first value in the high nibble
    ŵ_i   = NF4[q_i] · c_b                           dequantisation

Rounding to the nearest code bounds the error per block: |w_i − ŵ_i| ≤ c_b · max_k (NF4[k+1] − NF4[k]) / 2.

Double quantisation (QLoRA §3, "Double Quantization") quantises the absmax values themselves. They are all
positive, so their mean μ is subtracted first to centre them; then per group g of 256 absmax values:

    s_g = max_{b∈g} |c_b − μ|,   a_b = round(127 · (c_b − μ) / s_g)  (int8),   ĉ_b = a_b · s_g / 127 + μ

The extra error per weight is |NF4[q]| · |c_b − ĉ_b| ≤ s_g / 254. Storage per weight: 4 bits + 8/64 bits +
32/(64·256) bits ≈ 4.127 bits (4.5 bits with fp32 absmax), against 16 bits for fp16. (bitsandbytes maps the
second level through its 8-bit "dynamic" float code; this module uses plain symmetric int8, with the same
memory and a simple, testable bound.)

Dequantisation forms values in fp32 (as the bitsandbytes kernel does) and rounds once into the compute dtype.
On CUDA, when bitsandbytes is installed, its fused kernel dequantises the 4-bit codes (same layout: packed
codes + fp32 absmax); it is checked once against this module's path and dropped with a warning on any
mismatch or error, so the pure-PyTorch path is always the fallback.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

# bitsandbytes' NF4 table (quantiles of N(0,1) rescaled to [-1, 1], with an exact zero), index 0..15.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZE = 64
DQ_BLOCK_SIZE = 256
# Largest half-gap between adjacent codes: the worst-case rounding error relative to a block's absmax.
MAX_HALF_GAP = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2
_CHUNK = 1 << 22  # quantise this many weights at a time so int64 temporaries stay small on big matrices


def code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _pair_table(device) -> torch.Tensor:
    # [256, 2]: the two code values of every possible byte, so unpacking is one gather.
    c = code(device)
    b = torch.arange(256, device=device)
    return torch.stack([c[b >> 4], c[b & 15]], dim=1)


def _padded(n: int, block_size: int) -> int:
    return math.ceil(n / block_size) * block_size


def quantize(w: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = False,
             dq_block_size: int = DQ_BLOCK_SIZE) -> dict[str, torch.Tensor]:
    """Quantise `w` (any shape) to NF4. Returns the tensors to store, all on `w`'s device:

    `nf4` uint8 [n_pad/2] and either `absmax` fp32 [n_pad/B], or with `double_quant` `absmax_q` int8
    [n_pad/B], `absmax_scale` fp32 [ceil(n_pad/B/256)] and `absmax_mean` fp32 [] (scalar)."""
    if block_size % 2:
        raise ValueError("block_size must be even (two codes share a byte)")
    flat = w.detach().reshape(-1)
    n = flat.numel()
    n_pad = _padded(n, block_size)
    mids = (code(w.device)[1:] + code(w.device)[:-1]) / 2  # 15 decision boundaries between codes
    packed = torch.empty(n_pad // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_pad // block_size, dtype=torch.float32, device=w.device)
    step = max(block_size, _CHUNK // block_size * block_size)
    for start in range(0, n_pad, step):
        stop = min(start + step, n_pad)
        part = flat[start:min(stop, n)].float()
        if part.numel() < stop - start:  # zero-pad the tail block; zeros quantise exactly to code 7
            part = F.pad(part, (0, stop - start - part.numel()))
        blocks = part.view(-1, block_size)
        amax = blocks.abs().amax(dim=1)
        absmax[start // block_size:stop // block_size] = amax
        scaled = blocks / torch.where(amax > 0, amax, torch.ones_like(amax)).unsqueeze(1)
        # nearest code; a value exactly between two codes takes the lower one, as in bitsandbytes
        idx = torch.bucketize(scaled, mids).to(torch.uint8).view(-1)
        packed[start // 2:stop // 2] = (idx[0::2] << 4) | idx[1::2]
    if not double_quant:
        return {"nf4": packed, "absmax": absmax}
    return {"nf4": packed, **quantize_absmax(absmax, dq_block_size)}


def quantize_absmax(absmax: torch.Tensor, dq_block_size: int = DQ_BLOCK_SIZE) -> dict[str, torch.Tensor]:
    """Second-level quantisation of the fp32 absmax values: mean-subtracted, symmetric int8, blocks of 256."""
    mean = absmax.mean()
    centred = absmax - mean
    n = centred.numel()
    groups = F.pad(centred, (0, _padded(n, dq_block_size) - n)).view(-1, dq_block_size)
    scale = groups.abs().amax(dim=1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    q = torch.round(groups / safe * 127).clamp_(-127, 127).to(torch.int8).view(-1)[:n]
    return {"absmax_q": q, "absmax_scale": scale, "absmax_mean": mean}


def dequantize_absmax(state: dict[str, torch.Tensor], dq_block_size: int = DQ_BLOCK_SIZE) -> torch.Tensor:
    """The fp32 absmax per block, undoing double quantisation when present."""
    if "absmax" in state:
        return state["absmax"].float()
    q = state["absmax_q"]
    n = q.numel()
    groups = F.pad(q.float(), (0, _padded(n, dq_block_size) - n)).view(-1, dq_block_size)
    return (groups * (state["absmax_scale"].float().unsqueeze(1) / 127)).view(-1)[:n] + state["absmax_mean"].float()


def _dequantize_torch(packed: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    values = F.embedding(packed.to(torch.int32), _pair_table(packed.device))  # [n_pad/2, 2] fp32
    return (values.view(-1, block_size) * absmax.unsqueeze(1)).view(-1)


def dequantize(state: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
               block_size: int = BLOCK_SIZE, dq_block_size: int = DQ_BLOCK_SIZE) -> torch.Tensor:
    """Rebuild the weight of `shape` in `dtype` from the stored tensors (no autograd history)."""
    with torch.no_grad():
        absmax = dequantize_absmax(state, dq_block_size)
        packed = state["nf4"]
        flat = _kernel_dequantize(packed, absmax, block_size, dtype) if packed.is_cuda else None
        if flat is None:
            flat = _dequantize_torch(packed, absmax, block_size).to(dtype)
        return flat[:math.prod(shape)].view(shape)


def storage_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ------------------------------------------------------------------------------ optional CUDA kernel
_KERNEL = {"checked": False, "ok": False}


def _bnb():
    try:  # optional: bitsandbytes is not a dependency; any import problem means "use the torch path"
        import bitsandbytes.functional as bnbf
    except Exception:  # noqa: BLE001 (broken CUDA setups raise all sorts of errors at import)
        return None
    return bnbf


def _kernel_dequantize(packed, absmax, block_size, dtype) -> torch.Tensor | None:
    """bitsandbytes' fused NF4 dequantisation, or None to use the torch path."""
    if _KERNEL["checked"] and not _KERNEL["ok"]:
        return None
    bnbf = _bnb()
    if bnbf is None:
        _KERNEL.update(checked=True, ok=False)
        return None
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    try:
        out = torch.empty(packed.numel() * 2, dtype=dtype, device=packed.device)
        bnbf.dequantize_4bit(packed.view(-1, 1), absmax=absmax.contiguous(), out=out,
                             blocksize=block_size, quant_type="nf4")
        if not _KERNEL["checked"]:
            # Same layout is assumed (high nibble first, fp32 absmax); verify once rather than trust it.
            want = _dequantize_torch(packed, absmax, block_size).to(dtype)
            # A layout mismatch gives wrong values, not rounding noise, so a loose tolerance suffices.
            if not torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-6):
                raise RuntimeError(f"max difference {(out.float() - want.float()).abs().max().item():.3g}")
            _KERNEL.update(checked=True, ok=True)
        return out
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"bitsandbytes NF4 dequantisation unavailable ({e}); using the PyTorch path", stacklevel=3)
        _KERNEL.update(checked=True, ok=False)
        return None

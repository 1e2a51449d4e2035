"""NF4 block quantisation: the reference codebook, the rounding bound, double quantisation, layout, memory."""

import pytest
import torch

from tunelab.adapters import nf4

# bitsandbytes' NF4 table as printed in the QLoRA issue/spec (7 significant digits).
REFERENCE = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
             0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]


def test_codebook_equals_reference():
    c = nf4.code()
    assert c.dtype == torch.float32 and c.shape == (16,)
    torch.testing.assert_close(c, torch.tensor(REFERENCE), atol=1e-7, rtol=0)  # 7 decimals + fp32
    assert c[7] == 0 and c[0] == -1 and c[15] == 1
    assert torch.all(c[1:] > c[:-1])
    gaps = (c[1:] - c[:-1]) / 2
    assert nf4.MAX_HALF_GAP == pytest.approx(gaps.max().item())


def _blocks(x, block=64):
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)


@pytest.mark.parametrize("shape", [(96, 128), (33, 50)])  # the second is not a multiple of 64: padded tail
def test_roundtrip_error_within_block_bound(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    state = nf4.quantize(w)
    back = nf4.dequantize(state, w.shape, torch.float32)
    assert back.shape == w.shape and back.dtype == torch.float32
    err = _blocks((back - w).abs()).amax(dim=1)
    absmax = _blocks(w.abs()).amax(dim=1)
    assert torch.all(err <= absmax * nf4.MAX_HALF_GAP + 1e-6)
    # every block's absmax element is exact (it maps to code ±1)
    torch.testing.assert_close(_blocks(back.abs()).amax(dim=1), absmax, atol=1e-6, rtol=0)
    # and the codes really are the nearest ones: no other code value is closer to w/absmax
    scaled = _blocks(w) / absmax.unsqueeze(1)
    chosen = _blocks(back) / absmax.unsqueeze(1)
    best = (scaled.unsqueeze(-1) - nf4.code()).abs().amin(dim=-1)
    n = w.numel()
    torch.testing.assert_close((chosen - scaled).abs().view(-1)[:n], best.view(-1)[:n], atol=1e-6, rtol=0)


def test_double_quant_extra_error_is_bounded():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 0.02  # 1024 blocks, 4 groups
    single = nf4.quantize(w)
    double = nf4.quantize(w, double_quant=True)
    assert set(double) == {"nf4", "absmax_q", "absmax_scale", "absmax_mean"}
    assert double["absmax_q"].dtype == torch.int8 and double["absmax_scale"].shape == (4,)
    assert torch.equal(single["nf4"], double["nf4"])  # the 4-bit codes do not change
    c, c_hat = single["absmax"], nf4.dequantize_absmax(double)
    centred = (c - c.mean()).view(-1, 256)
    step = centred.abs().amax(dim=1) / 254  # half of one int8 step per group
    assert torch.all((c - c_hat).view(-1, 256).abs() <= step.unsqueeze(1) + 1e-9)
    a = nf4.dequantize(single, w.shape, torch.float32)
    b = nf4.dequantize(double, w.shape, torch.float32)
    # extra error per weight ≤ |code| · |c − ĉ| ≤ the group's step
    extra = (a - b).abs().reshape(-1, 64 * 256).amax(dim=1)
    assert torch.all(extra <= step + 1e-9)
    assert extra.max() > 0  # double quantisation is not a no-op
    err_b = (b - w).abs().reshape(-1, 64).amax(dim=1)
    assert torch.all(err_b <= c * nf4.MAX_HALF_GAP + step.repeat_interleave(256) + 1e-7)


def test_packing_layout_and_zero_blocks():
    # 64 values that hit codes 0..15 in order, four times; first value in the high nibble (bitsandbytes)
    vals = nf4.code().repeat(4) * 3.0
    state = nf4.quantize(vals)
    assert state["nf4"].dtype == torch.uint8 and state["nf4"].numel() == 32
    assert state["nf4"][0].item() == (0 << 4) | 1 and state["nf4"][7].item() == (14 << 4) | 15
    assert state["absmax"].tolist() == [3.0]
    torch.testing.assert_close(nf4.dequantize(state, vals.shape, torch.float32), vals)
    zeros = nf4.quantize(torch.zeros(2, 64))
    assert torch.all(zeros["nf4"] == 0x77) and torch.all(zeros["absmax"] == 0)  # code 7 is exactly 0.0
    assert torch.count_nonzero(nf4.dequantize(zeros, (2, 64), torch.float32)) == 0


def test_memory_below_a_third_of_fp16():
    w = torch.randn(256, 512)
    for dq in (False, True):
        ratio = nf4.storage_bytes(nf4.quantize(w, double_quant=dq)) / (w.numel() * 2)
        assert ratio <= (0.3 if not dq else 0.26), ratio  # 4.5 bits/16 = 0.281; 4.127 bits/16 = 0.258


def test_dequantize_dtypes_and_device_of_results():
    w = torch.randn(64, 64)
    state = nf4.quantize(w, double_quant=True)
    f32 = nf4.dequantize(state, w.shape, torch.float32)
    bf16 = nf4.dequantize(state, w.shape, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and not bf16.requires_grad
    torch.testing.assert_close(bf16, f32.to(torch.bfloat16), atol=0, rtol=0)  # rounded once from fp32
    with pytest.raises(ValueError, match="even"):
        nf4.quantize(w, block_size=63)


def test_kernel_path_is_optional():
    # Without bitsandbytes (CPU here) the CUDA kernel hook answers None and the torch path is used.
    if nf4._bnb() is None:
        state = nf4.quantize(torch.randn(64, 64))
        assert nf4._kernel_dequantize(state["nf4"], state["absmax"], 64, torch.float32) is None

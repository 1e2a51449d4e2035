"""`train.compute_dtype` (models/precision.py): `auto` takes bf16 on a CPU only where the measured bf16 matmul wins
(measured once per CPU + torch version, cached), fp32 elsewhere; unset keeps the old rule (no autocast on CPU);
bf16 autocast training stays within a stated bound of fp32 training, with fp32 weights and optimizer state."""

import json

import pytest
import torch

from tunelab.adapters.base import apply_method
from tunelab.config import TrainConfig
from tunelab.data.batches import StaticBatches
from tunelab.data.collate import collate
from tunelab.data.masking import Encoded
from tunelab.models import precision
from tunelab.models.modes import training_autocast
from tunelab.objectives.sft import SFT
from tunelab.train.loop import fit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision.json"


def _fake_timings(monkeypatch, fp32_s, bf16_s):
    calls = []

    def fake(dtype, n=precision.N, reps=precision.REPS):
        calls.append(dtype)
        return fp32_s if dtype == torch.float32 else bf16_s
    monkeypatch.setattr(precision, "measure_matmul_seconds", fake)
    return calls


def test_auto_falls_back_to_fp32_where_bf16_is_slower(cache, monkeypatch):
    calls = _fake_timings(monkeypatch, fp32_s=0.01, bf16_s=0.75)  # an AVX2-only CPU: bf16 emulated, 75× slower
    assert precision.resolve_compute_dtype("auto", "cpu") is None
    assert calls == [torch.float32, torch.bfloat16]
    saved = json.loads(cache.read_text())
    assert saved[precision.cache_key()]["speedup"] == pytest.approx(0.01 / 0.75, rel=1e-3)
    assert precision.resolve_compute_dtype("auto", "cpu") is None
    assert len(calls) == 2  # the second run read the cache: measured once per CPU and torch version


def test_auto_takes_bf16_where_it_wins_by_the_margin(cache, monkeypatch):
    _fake_timings(monkeypatch, fp32_s=0.04, bf16_s=0.01)  # AVX-512-BF16 / AMX: 4×
    assert precision.resolve_compute_dtype("auto", "cpu") is torch.bfloat16
    cache.unlink()
    _fake_timings(monkeypatch, fp32_s=0.011, bf16_s=0.01)  # 1.1×: the per-forward weight casts would eat it
    assert precision.resolve_compute_dtype("auto", "cpu") is None


def test_cache_is_keyed_by_cpu_and_torch_version(cache, monkeypatch):
    calls = _fake_timings(monkeypatch, 0.04, 0.01)
    precision.bf16_speedup()
    monkeypatch.setattr(precision, "cache_key", lambda: "another CPU | avx2 | torch 2.13.0")
    precision.bf16_speedup()
    assert len(calls) == 4 and len(json.loads(cache.read_text())) == 2


def test_settings_other_than_auto_never_measure(cache, monkeypatch):
    calls = _fake_timings(monkeypatch, 0.01, 0.75)
    assert precision.resolve_compute_dtype(None, "cpu") is None  # the default: fp32 on CPU, as before
    assert precision.resolve_compute_dtype("float32", "cpu") is None
    assert precision.resolve_compute_dtype("bfloat16", "cpu") is torch.bfloat16
    assert precision.resolve_compute_dtype(None, "cuda") is torch.bfloat16  # CUDA as before
    assert precision.resolve_compute_dtype("float32", "cuda") is None
    assert calls == [] and not cache.exists()


def test_measurement_really_times_both_dtypes():
    assert precision.measure_matmul_seconds(torch.float32, n=64, reps=1) > 0
    assert precision.measure_matmul_seconds(torch.bfloat16, n=64, reps=1) > 0


def test_training_autocast_follows_the_recorded_dtype(tiny):
    model = tiny("llama", vocab_size=100, layers=1)
    assert not training_autocast(model).__class__.__name__ == "autocast"  # unmarked CPU model: none, as before
    undo = precision.set_compute_dtype(model, torch.bfloat16)
    with training_autocast(model):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    undo()
    assert "tunelab_compute_dtype" not in model.__dict__


def _train(tiny, tmp_path, compute_dtype, method="lora"):
    g = torch.Generator().manual_seed(0)
    examples = [Encoded(ids, [False] * 4 + [True] * 12, False, 12)
                for ids in torch.randint(5, 500, (4, 16), generator=g).tolist()]
    batches = [collate(examples[:2], pad_id=0), collate(examples[2:], pad_id=0)]
    model = tiny("llama", vocab_size=500, layers=2)
    apply_method(model, method, {"r": 4, "alpha": 8})
    seen = []
    orig = SFT.loss

    def loss(self, m, batch):  # what the loop's forward ran under
        seen.append(torch.is_autocast_enabled("cpu"))
        return orig(self, m, batch)
    SFT.loss = loss
    try:
        cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-2, warmup_steps=0, scheduler="constant",
                          compute_dtype=compute_dtype)
        res = fit(model, SFT(), StaticBatches(lambda e: batches, 2), cfg, tmp_path / f"run-{compute_dtype}")
        model.loop_compute_dtype = res.compute_dtype
    finally:
        SFT.loss = orig
    rows = [json.loads(x) for x in (tmp_path / f"run-{compute_dtype}" / "metrics.jsonl").read_text().splitlines()]
    return model, [r["loss"] for r in rows if "loss" in r], seen


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_bf16_autocast_training_stays_within_bound_of_fp32(tiny, tmp_path, method):
    """4 AdamW steps of LoRA (DoRA, QLoRA) SFT on a tiny llama: every step's loss within 1e-3 (relative) of fp32's.

    bf16 rounds each matmul operand to an 8-bit mantissa (relative error ≤ 2^-9 ≈ 2e-3 per element), but the
    errors of a K-term dot product largely cancel and the loss averages over 48 tokens; measured on an AMX Xeon
    (torch 2.13) the largest relative loss differences were 4e-5 (LoRA), 2e-5 (DoRA) and 2.5e-4 (QLoRA, whose
    NF4-dequantised weights are rounded once more to bf16). 1e-3 leaves margin for other CPUs' kernels
    and still catches a wrong path (fp32 weights replaced by bf16 for good, updates lost below bf16's ulp).
    Weights and optimizer state stay fp32."""
    m32, l32, seen32 = _train(tiny, tmp_path, "float32", method)
    m16, l16, seen16 = _train(tiny, tmp_path, "bfloat16", method)
    assert not any(seen32) and all(seen16)  # the loop really ran one without and one with bf16 autocast
    assert len(l32) == len(l16) == 4
    for a, b in zip(l32, l16):
        assert b == pytest.approx(a, rel=1e-3)
    assert l16[-1] != l32[-1]  # bf16 changed what was computed (else the test compares fp32 with itself)
    assert all(p.dtype == torch.float32 for p in m16.parameters() if p.requires_grad)  # fp32 master weights
    assert "tunelab_compute_dtype" not in m16.__dict__  # undone when the loop ends
    assert (m32.loop_compute_dtype, m16.loop_compute_dtype) == ("float32", "bfloat16")  # LoopResult: results.json


def test_memory_mode_keeps_auto_at_fp32_on_a_cpu(cache, monkeypatch):
    """Memory mode puts the peak first: `auto` stays fp32 there even where bf16 wins; `bfloat16` set explicitly
    still applies, and CUDA keeps bf16."""
    calls = _fake_timings(monkeypatch, fp32_s=0.04, bf16_s=0.01)
    assert precision.resolve_compute_dtype("auto", "cpu", memory_mode=True) is None
    assert calls == []  # nothing to measure when the answer does not depend on it
    assert precision.resolve_compute_dtype("bfloat16", "cpu", memory_mode=True) is torch.bfloat16
    assert precision.resolve_compute_dtype("auto", "cuda", memory_mode=True) is torch.bfloat16
    assert precision.resolve_compute_dtype("auto", "cpu", memory_mode=False) is torch.bfloat16


def test_bf16_autocast_hides_adapter_updates_below_half_a_bf16_step():
    """Why the CPU default stays fp32 (models/precision.py): under bf16 autocast the base output is already on
    bf16's grid, so a LoRA delta smaller than half a bf16 step of it rounds away — the forward does not see the
    update at all; in fp32 it does. (A larger delta does show: the effect is on early, small updates.)"""
    from tunelab.adapters.lora import LoraLinear

    g = torch.Generator().manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(64, 64, bias=False), r=4, alpha=8)
    x = torch.randn(8, 64, generator=g)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(64, 4, generator=g) * 1e-6)  # a first small step from B = 0
        delta = layer.lora_forward(x)
        assert (layer(x) != layer.base_forward(x)).float().mean() > 0.95  # fp32: the update shows nearly everywhere
        with torch.autocast("cpu", torch.bfloat16):
            y16, base16 = layer(x), layer.base_forward(x)
            below = delta.abs() < 0.9 * 2.0**-9 * base16.float().abs()  # under half a bf16 step of the output
            assert below.float().mean() > 0.9
            assert torch.equal(y16[below], base16[below])  # bf16: rounded away, every such element
        layer.lora_B.weight.mul_(1e5)  # a delta of ~0.1·|y| (outside autocast: it caches its weight casts)
        with torch.autocast("cpu", torch.bfloat16):
            assert (layer(x) != layer.base_forward(x)).float().mean() > 0.95  # now visible in bf16 too

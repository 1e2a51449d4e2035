"""Which dtype the training forward computes in (`train.compute_dtype`), and whether bf16 pays on this CPU.

The weights stay where they are (fp32 master weights; the optimizer state of what trains stays fp32); only the
matmuls of the forward (and their backward) run in bf16 under `torch.autocast`, so the frozen base is read in
bf16 and the adapter's update is still accumulated into fp32 parameters. The settings:

    unset (null)  bf16 autocast on CUDA over fp32 weights, fp32 on CPU — the behaviour before the option existed
    float32       no autocast anywhere
    bfloat16      bf16 autocast on CUDA and on CPU
    auto          CUDA: bf16; CPU: bf16 only where a measured bf16 matmul beats fp32 by BF16_MIN_SPEEDUP

Why measure: CPUs differ by two orders of magnitude here. With AVX-512-BF16 or AMX, oneDNN's bf16 GEMM runs
at ~2–16× fp32; on an AVX2-only CPU torch emulates bf16 and the same matmul was measured ~75× *slower*
(benchmarks/README.md). Flags alone do not settle it (a VM may hide or emulate them), so `bf16_speedup()` times
REPS × an N×N matmul each way (after one warm-up each) — well under a second where bf16 is fast, a few seconds
where it is emulated — once per (CPU model, flags, torch version), and caches the ratio in
`<cache_dir>/precision.json` (cache_dir: $TUNELAB_CACHE or ~/.cache/tunelab).

Autocast casts each fp32 weight to bf16 on every forward, which costs memory bandwidth the bf16 GEMM then has
to win back; that is why `auto` asks for a clear margin (BF16_MIN_SPEEDUP), not merely "faster".

Why the CPU default stays fp32 although bf16 is much faster on AMX CPUs (`make bench`, 2026-12-06, quiet 2-core
Xeon with AMX: LoRA SFT 2.2×, full 1.6×, DPO 1.4× the fp32 tokens/s): bf16 changes what a run learns early on.
The frozen base's output comes out of the bf16 GEMM already on bf16's grid, so an adapter update smaller than
half a bf16 step of that output (|Δ| < 2^-9·|y|, e.g. the first steps of LoRA from B = 0 at lr 5e-5) rounds back
to the same value: the forward does not see it (tests/train/test_compute_dtype.py shows it on one layer). In the
same bench, 6 DPO steps at lr 5e-5 grew the reward margin to 0.03 in bf16 against 0.13 in fp32, and 6 LoRA SFT
steps at 2e-4 ended at loss 1.172 against 1.148; the demo (30 steps at lr 1e-3) ended at held-out 0.8837 against
0.8813. CUDA runs take the same trade (the loop always autocast to bf16 there) — on a CPU it is opt-in: `auto`.
Under `train.memory_mode`, `auto` stays fp32 (see resolve_compute_dtype).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..machine import machine
from .load import cache_dir

BF16_MIN_SPEEDUP = 1.25  # fp32 seconds / bf16 seconds needed before `auto` picks bf16 on a CPU
N, REPS = 1024, 3
SETTINGS = (None, "auto", "float32", "bfloat16")


def _cache_file() -> Path:
    return cache_dir() / "precision.json"


def cache_key() -> str:
    """What the measured ratio depends on: the CPU (model and flags) and torch's kernels (its version)."""
    m = machine()
    return f"{m.get('cpu')} | {' '.join(m.get('cpu_flags') or [])} | torch {torch.__version__}"


def measure_matmul_seconds(dtype: torch.dtype, n: int = N, reps: int = REPS) -> float:
    """Median wall seconds of one [n, n] @ [n, n] matmul in `dtype` on the CPU (one warm-up first)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bf16_speedup(refresh: bool = False) -> float:
    """fp32 time / bf16 time of the same CPU matmul (> 1: bf16 faster), measured once per cache key."""
    path, key = _cache_file(), cache_key()
    cached = {}
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    if not refresh and isinstance(cached.get(key), dict) and "speedup" in cached[key]:
        return float(cached[key]["speedup"])
    fp32 = measure_matmul_seconds(torch.float32)
    bf16 = measure_matmul_seconds(torch.bfloat16)
    speedup = fp32 / max(bf16, 1e-12)
    cached[key] = {"speedup": speedup, "fp32_s": fp32, "bf16_s": bf16, "n": N, "reps": REPS}
    try:  # a read-only home must not stop a run: the measurement is simply repeated next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached, indent=1) + "\n")
        tmp.replace(path)
    except OSError:
        pass
    return speedup


def resolve_compute_dtype(setting: str | None, device: torch.device | str,
                          memory_mode: bool = False) -> torch.dtype | None:
    """The autocast dtype of the training forward for `train.compute_dtype` on `device`; None = no autocast.

    Under `train.memory_mode`, `auto` stays fp32 on a CPU: memory mode puts the peak first, and there bf16
    autocast (its per-forward bf16 copies of the weights) raised peak RSS 1.6× for 1.05× the speed (`make bench`,
    2026-12-06); `bfloat16` set explicitly still applies."""
    kind = torch.device(device).type
    if setting == "auto" and memory_mode and kind == "cpu":
        return None
    if setting == "float32":
        return None
    if setting == "bfloat16":
        return torch.bfloat16 if kind in ("cuda", "cpu") else None
    if kind == "cuda":  # unset and auto: bf16 autocast over fp32 weights, as the loop always did on CUDA
        return torch.bfloat16
    if setting == "auto" and kind == "cpu":
        return torch.bfloat16 if bf16_speedup() >= BF16_MIN_SPEEDUP else None
    return None


def set_compute_dtype(model, dtype: torch.dtype | None):
    """Record on `model` the dtype `modes.training_autocast` uses (None: no autocast); returns the undo."""
    had = "tunelab_compute_dtype" in model.__dict__
    before = model.__dict__.get("tunelab_compute_dtype")
    model.__dict__["tunelab_compute_dtype"] = dtype

    def undo() -> None:
        if had:
            model.__dict__["tunelab_compute_dtype"] = before
        else:
            model.__dict__.pop("tunelab_compute_dtype", None)
    return undo

"""ab.py's levers of issue 27 (fewer, larger or cheaper matmuls), in ab.py's terms: A and B alternated in one
process on identical inputs, medians of wall and CPU time, the loss of each printed (they must agree).

  fuse-projections  A: LoRA as built, B: `train.fuse_projections` (adapters/fused.py: frozen q,k,v and gate,up
                    as one GEMM each) — the same loss to rounding
  bf16-auto         A: fp32, B: what `train.compute_dtype: auto` picks on this CPU (models/precision.py); the
                    row says the measured bf16/fp32 matmul speedup and the pick (on an AVX2-only CPU the pick is
                    fp32, and A and B are the same computation)

    PYTHONPATH=src .venv/bin/python benchmarks/ab.py fuse-projections bf16-auto [--layers 2] [--rows 4]
"""

from __future__ import annotations

import contextlib

import ab as harness


def lever_fuse_projections(args):
    from tunelab.adapters.fused import fuse_projections

    model, tok = harness.smollm2_like(args.layers)
    batch = harness.batch_of(harness.encoded(tok), args.rows, True, tok.pad_token_id)
    step = harness.sft_step(model, batch)
    loss_a = step()
    groups, undo = fuse_projections(model)
    loss_b = step()
    undo()

    def fused():
        _, u = fuse_projections(model)
        try:
            return step()
        finally:
            u()
    return harness.ab("fuse-projections", step, fused, args.reps,
                      "A: q,k,v and gate,up as separate GEMMs, B: one frozen-base GEMM per group",
                      groups=len(groups), loss_a=loss_a, loss_b=loss_b)


def lever_bf16_auto(args):
    import torch

    from tunelab.models.precision import bf16_speedup, resolve_compute_dtype

    speedup = bf16_speedup(refresh=True)
    dtype = resolve_compute_dtype("auto", "cpu")
    model, tok = harness.smollm2_like(args.layers)
    batch = harness.batch_of(harness.encoded(tok), args.rows, True, tok.pad_token_id)
    a = harness.sft_step(model, batch)
    b = harness.sft_step(model, batch, autocast=torch.autocast("cpu", dtype=dtype) if dtype else
                         contextlib.nullcontext())
    return harness.ab("bf16-auto", a, b, args.reps, "A: fp32, B: train.compute_dtype auto",
                      bf16_matmul_speedup=round(speedup, 3), auto_picks=str(dtype or torch.float32),
                      loss_a=a(), loss_b=b())

#!/usr/bin/env python
"""A/B micro-benchmarks, one per performance lever of issue #13: each alternates variant A and variant B in one
process on identical inputs, `--reps` times, and prints the median seconds of each and the ratio A/B (> 1: B is
faster). Short on purpose (seconds per lever) so that a loaded machine still gives a usable ratio; the
end-to-end figures come from `benchmarks/run.py` on a quiet machine.

    PYTHONPATH=src .venv/bin/python benchmarks/ab.py [lever ...] [--reps 5] [--layers 2] [--rows 4]

The model is SmolLM2-135M's architecture (its real widths: hidden 576, 9 heads / 3 kv heads, MLP 1536, vocab
49,152) cut to `--layers` decoder layers, randomly initialised, with tunelab's LoRA r=16 on all seven
projections; the data is the bundled GSM conversations, encoded like a run does (assistant-only loss).
Levers: attn-padded, attn-packed, checkpoint, lora-fuse, lora-addmm, bf16, compile, threads, grouping, adamw,
fuse-projections and bf16-auto (ab_matmul.py). Every row carries the machine (facts.machine_facts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from facts import machine_facts  # noqa: E402  (every row names its CPU, flags and versions)

LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def smollm2_like(layers: int, seed: int = 0):
    """(model with LoRA, tokenizer): SmolLM2-135M's config cut to `layers` layers, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.adapters.base import apply_method
    from tunelab.models.load import load_tokenizer, resolve

    folder = resolve("smollm2-135m")
    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_method(model, "lora", LORA)
    model.train()
    return model, load_tokenizer("smollm2-135m")


def encoded(tokenizer, n: int = 200, max_length: int = 512):
    from tunelab.data.formats import to_sample
    from tunelab.data.masking import encode_dataset
    from tunelab.data.sources import load_records
    from tunelab.data.templates import get_template

    records = load_records(str(ROOT / "src/tunelab/assets/data/gsm_sft.jsonl"), limit=n)
    template = get_template("auto", tokenizer)
    exs, _ = encode_dataset(tokenizer, [to_sample(r) for r in records], template=template, max_length=max_length)
    return exs


def batch_of(examples, rows: int, packed: bool, pad_id: int, max_length: int = 512) -> dict:
    from tunelab.data.collate import collate
    from tunelab.data.packing import pack

    items = pack(examples, max_length)[:rows] if packed else examples[:rows]
    return collate(items, pad_id, packed=packed)


def ab(name: str, a, b, reps: int, note: str = "", **extra) -> dict:
    """Alternate a() and b() `reps` times after one warm-up each: medians of wall and of process CPU time, and
    their ratios A/B. On a shared machine the CPU-time ratio is the steadier one (waiting for a core is not
    counted); on a quiet machine the two agree."""
    a(), b()
    wall = {"a": [], "b": []}
    cpu = {"a": [], "b": []}
    for _ in range(reps):
        for key, f in (("a", a), ("b", b)):
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    row = {"lever": name, "a_s": round(med["a"], 4), "b_s": round(med["b"], 4),
           "ratio_a_over_b": round(med["a"] / med["b"], 3), "a_cpu_s": round(cmed["a"], 4),
           "b_cpu_s": round(cmed["b"], 4), "cpu_ratio_a_over_b": round(cmed["a"] / cmed["b"], 3),
           "note": note, "load_avg": os.getloadavg()[0], **extra, "machine": machine_facts(None)}
    print(json.dumps(row), flush=True)
    return row


def sft_step(model, batch, fast: bool = True, autocast=None, body: bool = False):
    """One forward+backward of the SFT loss; `fast=False` hands the model the batch's own mask; `body=True`
    backpropagates the sum of the decoder's hidden states on real tokens instead (no head: isolates a lever
    of the decoder body from the lm_head's cost, which is the same in both variants)."""
    from tunelab.objectives import logprobs

    def run():
        with autocast or contextlib.nullcontext():
            if body:
                hidden, _ = logprobs.forward_hidden(model, batch)
                loss = hidden[batch["seq_ids"] >= 0].float().pow(2).mean()
            else:
                lp = logprobs.token_logprobs(model, batch)
                loss = -lp.sum() / batch["loss_mask"][:, 1:].sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    if fast:
        return run
    dense = (lambda m, b: {"attention_mask": b["attention_mask"], "position_ids": b["position_ids"]})

    def run_dense():
        real = logprobs.attention_inputs
        logprobs.attention_inputs = dense
        try:
            return run()
        finally:
            logprobs.attention_inputs = real
    return run_dense


# ------------------------------------------------------------------------------------------------ levers
def lever_attention(args, packed: bool):
    model, tok = smollm2_like(args.layers)
    batch = batch_of(encoded(tok), args.rows, packed, tok.pad_token_id)
    return ab("attn-packed" if packed else "attn-padded", sft_step(model, batch, fast=False, body=True),
              sft_step(model, batch, fast=True, body=True), args.reps,
              "decoder body fwd+bwd; A: the batch's mask (CPU flash kernel with a mask), B: mask-free form",
              tokens=int(batch["input_ids"].numel()))


def saved_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward during fn() (the activation memory, measured exactly)."""
    total, seen = [0], set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def lever_checkpoint(args):
    from tunelab.models.checkpointing import checkpoint_layers

    rows = []
    for part in ("mlp", "attention", "layer"):
        model, tok = smollm2_like(args.layers)
        batch = batch_of(encoded(tok), args.rows, True, tok.pad_token_id)
        tokens = int(batch["input_ids"].numel())
        base = sft_step(model, batch)
        before = saved_bytes(base)
        undo = checkpoint_layers(model, part)
        after = saved_bytes(sft_step(model, batch))
        undo()
        on = sft_step(model, batch)

        def b(on=on, model=model, part=part):
            u = checkpoint_layers(model, part)
            try:
                on()
            finally:
                u()
        rows.append(ab(f"checkpoint-{part}", base, b, args.reps, "A: none, B: checkpoint each layer's " + part,
                       saved_kb_per_token_a=round(before / tokens / 1024, 1),
                       saved_kb_per_token_b=round(after / tokens / 1024, 1)))
    return rows


def lever_lora_fuse(args):
    """q,k,v (and gate,up) share their input: one x @ [A_q | A_k | A_v] instead of three x @ A."""
    torch.manual_seed(0)
    x = torch.randn(args.rows * 512, 576, requires_grad=True)
    As = [torch.randn(576, 16, requires_grad=True) for _ in range(3)]

    def separate():
        sum((x @ A).sum() for A in As).backward()

    def fused():
        torch.cat(As, 1).requires_grad_()
        (x @ torch.cat(As, 1)).sum().backward()
    return ab("lora-fuse", separate, fused, args.reps * 4, "LoRA down-projections of q,k,v: 3 matmuls vs 1")


def lever_lora_addmm(args):
    """LoRA layer output: y + (B(A x))·s (three [tokens, out] passes) vs one addmm."""
    from tunelab.adapters.lora import LoraLinear

    model, tok = smollm2_like(args.layers)
    batch = batch_of(encoded(tok), args.rows, True, tok.pad_token_id)
    new = LoraLinear.forward

    def old(self, x):
        y = self.base_forward(x)
        return (y + self.lora_forward(x)).to(y.dtype)

    def variant(fwd):
        step = sft_step(model, batch, body=True)

        def run():
            LoraLinear.forward = fwd
            try:
                return step()
            finally:
                LoraLinear.forward = new
        return run
    return ab("lora-addmm", variant(old), variant(new), args.reps, "A: y + B(A x)*s, B: addmm(y, A x, Bᵀ, s)")


def lever_bf16(args):
    model, tok = smollm2_like(args.layers)
    batch = batch_of(encoded(tok), args.rows, True, tok.pad_token_id)
    a, b = sft_step(model, batch), sft_step(model, batch, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    a(), b()  # the LoRA B matrices are zero at init: one update each would differ; compare the same weights
    return ab("bf16-autocast", a, b, args.reps, "A: fp32, B: bf16 autocast on CPU",
              loss_a=a(), loss_b=b())


def lever_compile(args):
    """`train.compile` as the loop applies it (models/compiling.py): compile time, then eager vs compiled steps
    (the loss of both printed: they must agree)."""
    from tunelab.models.compiling import compile_layers

    model, tok = smollm2_like(args.layers)
    batch = batch_of(encoded(tok), args.rows, True, tok.pad_token_id)
    eager = sft_step(model, batch)
    loss_e = eager()
    undo = compile_layers(model)
    t0 = time.perf_counter()
    loss_c = eager()  # the first compiled step: Dynamo + inductor (+ gcc); later steps reuse the graphs
    compile_s = time.perf_counter() - t0
    undo()

    def compiled():
        u = compile_layers(model)
        try:
            return eager()
        finally:
            u()
    return ab("compile", eager, compiled, args.reps, "A: eager, B: train.compile (each decoder layer compiled)",
              compile_seconds=round(compile_s, 1), loss_eager=loss_e, loss_compiled=loss_c)


THREAD_SETTINGS = {"default": {}, "omp1": {"OMP_NUM_THREADS": "1"}, "interop1": {"AB_INTEROP_THREADS": "1"},
                   "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "active": {"OMP_WAIT_POLICY": "ACTIVE"},
                   "bind": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}}


def lever_threads(args):
    """Thread settings, each in its own child process (OMP_* is read once, at start): torch's default (one
    thread per core, as many inter-op threads), 1 OpenMP thread, 1 inter-op thread, libgomp's wait policies and
    thread binding. torch here links GNU libgomp, so Intel's KMP_* variables have no effect. The children run
    round-robin, `--reps` rounds; each reports the median of 3 steps; medians over rounds per setting."""
    import subprocess

    res = {k: {"wall": [], "cpu": []} for k in THREAD_SETTINGS}
    for _ in range(args.reps):
        for name, extra in THREAD_SETTINGS.items():
            proc = subprocess.run([sys.executable, __file__, "thread-child", "--layers", str(args.layers),
                                   "--rows", str(args.rows), "--threads", "0"], env={**os.environ, **extra},
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"thread child {name} failed:\n{proc.stderr[-2000:]}")
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            res[name]["wall"].append(got["wall"])
            res[name]["cpu"].append(got["cpu"])
    base = statistics.median(res["default"]["wall"])
    row = {"lever": "threads", "load_avg": os.getloadavg()[0], "machine": machine_facts(None),
           "note": "median step seconds per setting; ratio = default / setting (> 1: the setting is faster)"}
    for name, r in res.items():
        wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
        row[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "ratio": round(base / wall, 3)}
    print(json.dumps(row), flush=True)
    return row


def thread_child(args):
    if os.environ.get("AB_INTEROP_THREADS"):
        torch.set_num_interop_threads(int(os.environ["AB_INTEROP_THREADS"]))
    model, tok = smollm2_like(args.layers)
    step = sft_step(model, batch_of(encoded(tok), args.rows, True, tok.pad_token_id))
    step()
    wall, cpu = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"wall": statistics.median(wall), "cpu": statistics.median(cpu),
                      "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads()}))


def lever_adamw(args):
    """The optimizer step alone, on SmolLM2-135M's full parameter set (full finetuning) and on its LoRA r16
    adapters (`--layers` 30 for the real model): torch's CPU default (a Python loop over the tensors) vs
    `fused=True` (one kernel per tensor, what TRL's default `adamw_torch_fused` runs) vs `foreach=True`."""
    rows = []
    for label in ("lora", "full"):
        model, _ = smollm2_like(args.layers)
        if label == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opts = {k: torch.optim.AdamW(params, lr=1e-5, **kw) for k, kw in
                (("loop", {"foreach": False}), ("fused", {"fused": True}), ("foreach", {"foreach": True}))}
        size = f"{len(params)} tensors, {sum(p.numel() for p in params):,} values"
        for kind in ("fused", "foreach"):
            rows.append(ab(f"adamw-{label}-{kind}", opts["loop"].step, opts[kind].step, args.reps,
                           f"A: for-loop AdamW (torch's CPU default), B: {kind}; {size}"))
    return rows


def lever_grouping(args):
    """Padding of one-example-per-row batches: random order vs length-grouped (no timing needed)."""
    _, tok = smollm2_like(1)
    exs = encoded(tok, n=600)
    lengths = [len(e) for e in exs]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(exs), generator=g).tolist()

    def waste(idx):
        chunks = [idx[k:k + 8] for k in range(0, len(idx), 8)]
        slots = sum(max(lengths[i] for i in c) * len(c) for c in chunks)
        return 1 - sum(lengths) / slots

    grouped = [i for k in range(0, len(order), 64) for i in sorted(order[k:k + 64], key=lengths.__getitem__)]
    row = {"lever": "grouping", "padding_random": round(waste(order), 3),
           "padding_grouped_within_64": round(waste(grouped), 3),
           "note": "fraction of padded positions, batch 8; packing (default) wastes " +
                   f"{1 - sum(lengths) / (512 * len(_rows(exs))):.3f}"}
    print(json.dumps(row), flush=True)
    return row


def _rows(exs):
    from tunelab.data.packing import pack
    return pack(exs, 512)


LEVERS = {"attn-padded": lambda a: lever_attention(a, False), "attn-packed": lambda a: lever_attention(a, True),
          "checkpoint": lever_checkpoint, "lora-fuse": lever_lora_fuse, "lora-addmm": lever_lora_addmm, "bf16": lever_bf16,
          "compile": lever_compile, "threads": lever_threads, "grouping": lever_grouping, "adamw": lever_adamw,
          "fuse-projections": lambda a: __import__("ab_matmul").lever_fuse_projections(a),  # issue 27
          "bf16-auto": lambda a: __import__("ab_matmul").lever_bf16_auto(a)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("levers", nargs="*", default=list(LEVERS), help=f"any of {', '.join(LEVERS)}")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.threads:  # 0: leave torch's default (the thread-settings children)
        torch.set_num_threads(args.threads)
    if args.levers == ["thread-child"]:
        return thread_child(args)
    for name in args.levers:
        if name not in LEVERS:
            sys.exit(f"unknown lever {name!r}; choose from {', '.join(LEVERS)}")
        LEVERS[name](args)


if __name__ == "__main__":
    main()

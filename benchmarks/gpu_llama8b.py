#!/usr/bin/env python
"""GPU side by side at Llama-3-8B scale (for a machine with a CUDA device; nothing is downloaded).

    PYTHONPATH=src .venv/bin/python benchmarks/gpu_llama8b.py [--steps 5] [--batch 2] [--seq 2048] [--parts ...]

The model is Llama-3-8B's architecture (hidden 4,096, 32 layers, 32/8 heads, MLP 14,336, vocab 128,256)
randomly initialised from its config in bf16 on the GPU; the data is random token ids, every row a full
`--seq` tokens (no padding), loss on every token. Each part runs in its own child process (clean peak memory,
and one failing part does not cost the others) and prints one JSON line; the driver prints them all:

  ceiling   bf16 torch.mm 8192² — the MFU denominator, measured, not a datasheet figure
  tunelab   tunelab LoRA r16 on q,k,v,o,gate,up,down; SDPA (no mask → flash kernel); the chunked, checkpointed
            linear + cross-entropy over loss tokens (`objectives.logprobs`, never [B, T, vocab] logits);
            torch.compile per decoder layer (`--no-compile` to skip); AdamW on the adapter
  peer      HF PEFT LoRA (same config) + TRL SFTTrainer, bf16, SDPA, pre-tokenized rows (`--no-peer` to skip)
  qlora     tunelab qlora (NF4 base, double quant) + LoRA, one step at `--seq`: peak memory

Self-checks before timing (a failing check aborts the part with its reason): tunelab's loss on the first
batch equals the HF model's own `labels=` loss within bf16 tolerance, the loss is finite, every LoRA B gets a
nonzero gradient after one step. MFU = model FLOPs / s / measured ceiling, with model FLOPs per token
= 4·N (LoRA: forward 2N + activation gradients 2N; no weight gradients for the frozen base) + 6·L·T·d for
causal attention (forward 2·L·T·d, backward twice that); N excludes the embedding.
Budget: about 2 minutes per part on an H100/H200-class GPU; total well under 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def build(layers: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**LLAMA3_8B, **({"num_hidden_layers": layers} if layers else {})})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model


def flops_per_token(model, seq: int) -> float:
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 4 * n + 6 * c.num_hidden_layers * seq * c.hidden_size


def batch_of(args, vocab: int, step: int):
    import torch

    g = torch.Generator(device="cuda").manual_seed(step)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device="cuda", generator=g)
    ones = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "position_ids": torch.arange(args.seq, device="cuda")
            .expand(args.batch, -1), "loss_mask": ones.bool(), "seq_ids": torch.zeros_like(ids)}


def timed(step, n: int) -> list[float]:
    import torch

    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def part_ceiling(args) -> dict:
    import torch

    a, b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16), torch.randn(8192, 8192, device="cuda",
                                                                                      dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ts = timed(lambda: [a @ b for _ in range(10)], 5)
    return {"part": "ceiling", "bf16_tflops": round(2 * 8192**3 * 10 / min(ts) / 1e12, 1),
            "device": torch.cuda.get_device_name()}


def part_tunelab(args) -> dict:
    import torch
    import torch.nn.functional as F

    from tunelab.adapters.base import apply_method
    from tunelab.objectives.logprobs import token_logprobs

    model = build(args.layers)
    apply_method(model, "lora", LORA)
    model.train()
    b = batch_of(args, model.config.vocab_size, 0)
    with torch.no_grad():  # check 1: the chunked head computes the model's own loss
        ours = -token_logprobs(model, b)[:, 1:].mean()
        theirs = model(input_ids=b["input_ids"], labels=b["input_ids"]).loss
        assert torch.isfinite(ours) and abs(float(ours - theirs)) < 2e-2 * float(theirs), (float(ours), float(theirs))
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    state = {"i": 0, "loss": None}

    def step():
        batch = batch_of(args, model.config.vocab_size, state["i"])
        state["i"] += 1
        lp = token_logprobs(model, batch, chunk_size=4096)
        loss = -lp[:, 1:].sum() / lp[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = float(loss)

    t0 = time.perf_counter()
    step()  # check 2: every adapter moved (its B was zero-initialised)
    assert all(float(m.lora_B.weight.abs().sum()) > 0 for m in model.modules() if hasattr(m, "lora_B"))
    first = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    ts = timed(step, args.steps)
    return _report("tunelab", model, args, ts, first, state["loss"])


def part_peer(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model = build(args.layers)
    n = args.batch * (args.steps + 2)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (n, args.seq), generator=g).tolist()
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
            if len(times) == 2:
                torch.cuda.reset_peak_memory_stats()

    cfg = SFTConfig(output_dir="/tmp/gpu_peer", max_steps=args.steps + 2, per_device_train_batch_size=args.batch,
                    learning_rate=1e-4, max_length=args.seq, bf16=True, activation_checkpointing=False,
                    packing=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    from tunelab.models.load import load_tokenizer  # any tokenizer with a pad token: the rows are token ids already

    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=load_tokenizer(os.environ.get("GPU_TOKENIZER", "smollm2-135m")),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                                target_modules=LORA["target_modules"], task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    trainer.train()
    loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]
    return _report("peer", model, args, times[2:], times[0], loss)


def part_qlora(args) -> dict:
    import torch

    from tunelab.adapters.base import apply_method
    from tunelab.objectives.logprobs import token_logprobs

    model = build(args.layers)
    apply_method(model, "qlora", {**LORA, "compute_dtype": "bfloat16"})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    args.batch = 1
    ts = timed(lambda: (-token_logprobs(model, batch_of(args, model.config.vocab_size, 0))).mean().backward(), 2)
    return {"part": "qlora", "seq": args.seq, "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "step_seconds": round(min(ts), 3)}


def _report(name, model, args, ts, first, loss) -> dict:
    import torch

    med = sorted(ts)[len(ts) // 2]
    tokens = args.batch * args.seq
    return {"part": name, "batch": args.batch, "seq": args.seq, "compile": args.compile,
            "first_step_seconds": round(first, 2), "step_seconds_median": round(med, 3),
            "tokens_per_s": round(tokens / med, 1), "model_tflops": round(flops_per_token(model, args.seq)
                                                                           * tokens / med / 1e12, 1),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2), "last_loss": loss,
            "loss_is_finite": math.isfinite(loss)}


PARTS = {"ceiling": part_ceiling, "tunelab": part_tunelab, "peer": part_peer, "qlora": part_qlora}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a smoke test of the script)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--parts", nargs="*", default=list(PARTS))
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--timeout", type=int, default=240, help="seconds per part")
    args = ap.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args)), flush=True)
        return
    results = {}
    for part in args.parts:
        cmd = [sys.executable, __file__, "--part", part, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq)] + (["--layers", str(args.layers)] if args.layers else []) + \
              ([] if args.compile else ["--no-compile"])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            results[part] = json.loads(last) if proc.returncode == 0 else {"error": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            results[part] = {"error": f"timed out after {args.timeout} s"}
        print(json.dumps(results[part]), flush=True)
    ceiling = results.get("ceiling", {}).get("bf16_tflops")
    for name in ("tunelab", "peer"):
        r = results.get(name, {})
        if ceiling and "model_tflops" in r:
            r["mfu"] = round(r["model_tflops"] / ceiling, 3)
    if "tokens_per_s" in results.get("tunelab", {}) and "tokens_per_s" in results.get("peer", {}):
        results["ratio_tokens_per_s"] = round(results["tunelab"]["tokens_per_s"] / results["peer"]["tokens_per_s"], 2)
    try:  # the machine, as every benchmark row records it (the script's own folder is on sys.path)
        from facts import machine_facts

        results["machine"] = machine_facts(None)
    except Exception as e:  # provenance never costs the measurement of a short GPU slot
        results["machine"] = {"error": repr(e)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()

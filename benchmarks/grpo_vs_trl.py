#!/usr/bin/env python
"""GRPO side by side: TRL 1.16 `GRPOTrainer` + PEFT (the peer, `../shared/peers/peer_grpo.py`) vs tunelab, on the
same workload, back to back in one run — report ratios, never absolute times (run it on a quiet machine).

Workload (the peer's, see its docstring): SmolLM2-135M-Instruct fp32, LoRA r=16 α=32 dropout 0 on
q,k,v,o,gate,up,down, lr 1e-4 linear decay, no warmup, clip 1.0, seed 42; 64 reasoning-gym gsm_symbolic prompts
(seed 7) as one user message each; 4 prompts × G=4 completions = 16 rows per optimizer step, temperature 1.0,
≤ 128 new tokens; exact-match reward on the number after "####"; DAPO token-mean loss, ε 0.2, KL β 0.04 to the
adapter-off model. tunelab samples with its own KV-cache loop (`sampling.sample`), TRL with `model.generate()`.

    .venv/bin/python benchmarks/grpo_vs_trl.py --steps 3 [--peer ../shared/peers/peer_grpo.py]

Prints one JSON line: each system's median seconds per step, completion tokens/s, peak RSS, rewards per step,
and tunelab/peer ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_peer(peer: Path, steps: int, cache: Path, prefix: list[str] | None = None) -> dict:
    """The peer in a child process (`prefix`: a wrapper script before it, e.g. peers/peer_bf16.py)."""
    env = {**os.environ, "PEER_CACHE": str(cache)}
    out = subprocess.run([sys.executable, *(prefix or []), str(peer), "--steps", str(steps)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"peer failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tunelab_config(data: Path, out: Path, steps: int, train: dict | None = None) -> Path:
    """The GRPO run config written to `<out>.yaml`; `train` adds or overrides train settings (run.py's levers)."""
    import yaml

    cfg = {"output_dir": str(out), "overwrite": True, "method": "lora", "objective": "grpo",
           "model": {"name": "smollm2-135m", "dtype": "float32"},
           "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 640},
           "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
           "train": {"max_steps": steps, "batch_size": 16, "grad_accum": 1, "lr": 1e-4, "scheduler": "linear",
                     "warmup_steps": 0, "max_grad_norm": 1.0, "seed": 42, **(train or {})},
           "grpo": {"beta": 0.04, "loss_agg": "token_mean", "epsilon": 0.2},
           "rl": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 128, "temperature": 1.0, "eval_prompts": 0,
                  "rewards": [{"name": "exact_match", "extract": "gsm8k", "answer_field": "answer"}]},
           "samples": {"n_heldout": 0}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_tunelab(config: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    # a child that reports its own peak RSS (RUSAGE_CHILDREN would also count the peer's process)
    code = ("import resource, sys; from tunelab.cli import main; rc = main(['train', sys.argv[1]]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"tunelab failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    res = json.loads((out / "results.json").read_text())
    completion_tokens = sum(r["completion_length"] * 16 for r in steps)
    return {"system": "tunelab-grpo", "steps": res["steps"], "train_seconds": round(res["train_seconds"], 3),
            "seconds_per_step_median": round(statistics.median(r["step_seconds"] for r in steps), 3),
            "completion_tokens": round(completion_tokens),
            "completion_tokens_per_s": round(completion_tokens / res["train_seconds"], 2),
            "rollout_tokens_per_s_median": round(statistics.median(r["rollout_tokens_per_s"] for r in steps), 2),
            "step_reward_mean": [round(r["reward"], 4) for r in steps],
            "step_completion_length_mean": [round(r["completion_length"], 2) for r in steps],
            "kl_last": steps[-1].get("kl"), "wall_seconds": round(wall, 1), "compute_dtype": res.get("compute_dtype"),
            "peak_rss_mb": round(int(proc.stdout.split("PEAK_RSS_KB")[-1].split()[0]) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peer", type=Path, default=ROOT.parent / "shared" / "peers" / "peer_grpo.py")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "peers")
    ap.add_argument("--skip-peer", action="store_true", help="tunelab only (the peer's prompt file must exist)")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    data = args.cache / "peer_bench" / "gsm_symbolic_seed7_n64_grpo.jsonl"
    peer = None if args.skip_peer else run_peer(args.peer, args.steps, args.cache)  # also prepares the prompts
    out = ROOT / "runs" / "bench_grpo"
    mine = run_tunelab(tunelab_config(data, out, args.steps), out)
    from facts import machine_facts  # the script's own folder (benchmarks/) is on sys.path

    report = {"steps": args.steps, "tunelab": mine, "peer": peer, "machine": machine_facts(None)}
    if peer:
        report["ratios"] = {
            "step_time_speedup": round(peer["seconds_per_step_median"] / mine["seconds_per_step_median"], 2),
            "completion_tokens_per_s": round(mine["completion_tokens_per_s"] / peer["completion_tokens_per_s"], 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()

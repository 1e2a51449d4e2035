"""What every benchmark row carries: where it was measured (tunelab.machine's provenance: CPU model and the flags
that matter — avx2, avx512f, avx512_bf16, amx_* —, cores, torch's CPU kernel level, versions), the load, and the
matmul ceilings in fp32 and bf16; plus the issue-27 goals and their verdicts. Shared by run.py, ab.py,
grpo_vs_trl.py and profile_step.py so that every figure names its machine the same way.

A ceiling is GFLOP/s of `torch.mm` on n×n matrices (2n³ flops each), measured for `seconds` after two warm-ups.
bf16 next to fp32 says what the CPU offers: on AVX-512-BF16/AMX CPUs oneDNN's bf16 GEMM is several times fp32;
on an AVX2-only CPU bf16 is emulated and was measured ~75× slower (benchmarks/README.md).
"""

from __future__ import annotations

import os
import time

# issue 27's goals: (workload, what is compared, the goal, how it is read off a row)
GOALS = (("sft-lora", "LoRA SFT tokens/s ≥ 2.5× the peer"), ("sft-full", "full finetuning tokens/s ≥ 2× the peer"),
         ("sft-memory", "memory mode ≤ 0.2× the peer's peak RSS at ≥ 1.5× its tokens/s"),
         ("dpo", "DPO tokens/s ≥ 1.5× the peer"), ("grpo", "GRPO seconds/step ≥ 3× faster than the peer"))


def matmul_ceiling(seconds: float, dtype=None, n: int = 2048) -> float:
    """GFLOP/s of torch.mm on n×n matrices in `dtype` (fp32 by default), as peer_sft.py --matmul-bench measures."""
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or reps == 0:
        torch.mm(a, b, out=out)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def matmul_ceilings(seconds: float) -> dict:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s}, each measured for `seconds`."""
    import torch

    return {"fp32": matmul_ceiling(seconds, torch.float32), "bf16": matmul_ceiling(seconds, torch.bfloat16)}


def machine_facts(ceilings: dict | None) -> dict:
    """The dict every row stores under "machine": tunelab.machine's provenance flattened (versions, CPU, flags,
    cores, torch_cpu_capability, GPU), the thread count and load, and both matmul ceilings (GFLOP/s)."""
    import torch

    from tunelab.machine import provenance

    prov = provenance()
    m = prov["machine"]
    ceilings = ceilings or {}
    return {**prov["versions"], "tunelab": prov["tunelab"], "git_commit": prov["git_commit"],
            "git_dirty": prov["git_dirty"], "cpu": m["cpu"], "cpu_flags": m["cpu_flags"], "cores": m["cores"],
            "cpus": m["cores"], "ram_gb": m["ram_gb"], "torch_cpu_capability": m["torch_cpu_capability"],
            "gpu": m["gpu"], "os": m["os"], "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
            "matmul_fp32_gflops": _round(ceilings.get("fp32")), "matmul_bf16_gflops": _round(ceilings.get("bf16"))}


def _round(x):
    return None if x is None else round(x, 1)


def build_row(workload: str, rep: dict, *, steps: int, wall_seconds: float, facts: dict, quick: bool) -> dict:
    """One results.jsonl row: the workload's measurements `rep` plus when, how long and where (`facts`)."""
    return {**rep, "workload": workload, "steps": steps, "wall_seconds": round(wall_seconds, 1),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": facts, "quick": quick}


def describe_machine(facts: dict) -> str:
    """One line for a report's header: the CPU, its flags, cores, torch's kernel level and both ceilings."""
    flags = " ".join(facts.get("cpu_flags") or []) or "no flags recorded"
    line = (f"{facts.get('cpu') or 'unknown CPU'} · {facts.get('cores')} cores · {flags} · torch "
            f"{facts.get('torch')} ({facts.get('torch_cpu_capability')}), {facts.get('torch_threads')} threads · "
            f"load {facts.get('load_avg', 0):.1f}")
    if facts.get("matmul_fp32_gflops") is not None:
        line += f" · matmul ceiling fp32 {facts['matmul_fp32_gflops']} GFLOP/s"
        if facts.get("matmul_bf16_gflops") is not None:
            line += f", bf16 {facts['matmul_bf16_gflops']} GFLOP/s"
    return line


def goal_verdict(workload: str, ratios: dict) -> tuple[str, bool] | None:
    """(the measured figure in words, met?) for one workload's ratios against the peer; None without a peer."""
    if not ratios:
        return None
    tps, rss = ratios.get("tokens_per_s"), ratios.get("peak_rss")
    if workload == "sft-lora" and tps is not None:
        return f"{tps}× tokens/s", tps >= 2.5
    if workload == "sft-full" and tps is not None:
        return f"{tps}× tokens/s", tps >= 2.0
    if workload == "sft-memory" and tps is not None and rss is not None:
        return f"{rss}× peak RSS at {tps}× tokens/s", rss <= 0.2 and tps >= 1.5
    if workload == "dpo" and tps is not None:
        return f"{tps}× tokens/s", tps >= 1.5
    if workload == "grpo" and ratios.get("step_time_speedup") is not None:
        return f"{ratios['step_time_speedup']}× seconds/step", ratios["step_time_speedup"] >= 3.0
    return None


def goals_report(results: dict) -> str:
    """Per goal: met / not met for tunelab's default and for each lever variant run beside it."""
    lines = ["goals (issue 27):"]
    for workload, goal in GOALS:
        rep = results.get(workload)
        if not rep:
            continue
        variants = [("default", rep.get("ratios") or {})]
        variants += [(name, v.get("ratios") or {}) for name, v in (rep.get("levers") or {}).items()]
        if rep.get("peer_bf16"):  # --peer-bf16: the same goals against the peer run with bf16=True
            variants += [("default vs bf16 peer", rep.get("ratios_vs_peer_bf16") or {})]
            variants += [(f"{name} vs bf16 peer", v.get("ratios_vs_peer_bf16") or {})
                         for name, v in (rep.get("levers") or {}).items()]
        for name, ratios in variants:
            verdict = goal_verdict(workload, ratios)
            if verdict is None:
                lines.append(f"  {goal:62s} [{name}] no peer run: not judged")
            else:
                lines.append(f"  {goal:62s} [{name}] {verdict[0]}: {'MET' if verdict[1] else 'NOT MET'}")
    return "\n".join(lines)

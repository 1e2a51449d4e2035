#!/usr/bin/env python
"""tunelab vs the peer (HF PEFT + TRL), back to back on the same workload, in one command (`make bench`).

    PYTHONPATH=src .venv/bin/python benchmarks/run.py [workload ...] [--steps N | --quick]

Workloads (issues #13 and #27: goals in brackets; every peer is documented in its own docstring):

  sft-lora     peer_sft.py (SFTTrainer + PEFT LoRA, padded)  vs tunelab LoRA SFT at defaults (packed)   [≥ 2.5×]
  sft-full     peer_sft.py --full                            vs tunelab method full                      [≥ 2×]
  sft-memory   peer_sft.py (as sft-lora)                     vs tunelab `train.memory_mode: true`, plus
               tunelab's peak RSS over max_length 256 → 4,096 (one packed row per step)  [≤ 0.2× RSS, ≥ 1.5×]
  dpo          benchmarks/peers/peer_dpo.py (DPOTrainer, ref log-probs precomputed) vs tunelab dpo with
               `reference.precompute`                                                                     [≥ 1.5×]
  grpo         peer_grpo.py vs tunelab grpo (benchmarks/grpo_vs_trl.py's workload; seconds/step)           [≥ 3×]
  data-memory  tunelab only: RSS and tensors held by the batch source before step 1, 1k vs 10k records
               (issue #16 item 11), lazy batches vs the old eager epoch

Prints the machine (CPU model, the flags that matter, cores, torch's CPU kernel level, the fp32 and bf16 matmul
ceilings measured first), one table (tokens/s, peak RSS, estimated MFU against the ceiling of the dtype each system
computed in, ratios) and each goal met / not met, and appends one JSON object per workload to
benchmarks/results.jsonl (facts.build_row: the same machine facts in every row). `--levers fused,bf16-auto`
(what `make bench` passes) also runs tunelab with `train.fuse_projections: true` and with `train.compute_dtype:
auto` beside its default on each workload, judged against the same goals (`fp32` names the default explicitly).
`--peer-bf16` (also in `make bench`) runs each peer once more with `bf16=True` (peers/peer_bf16.py): the fair
peer for tunelab's bf16 rows; every tunelab row then gets its ratios against it too.
`--quick` (2 steps, 2 s ceiling) is a smoke run; the figures worth quoting come from a quiet machine.
Every system runs in its own child process, so each peak RSS is that system's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from facts import (build_row, describe_machine, goals_report, machine_facts, matmul_ceiling,  # noqa: E402,F401
                   matmul_ceilings)

PEERS = ROOT.parent / "shared" / "peers"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
N_PARAMS = 134_515_008  # SmolLM2-135M, tied embedding counted once (as peer_sft.py reports)
# measured levers (`--levers`): each runs tunelab once more beside its default, with these train settings
LEVERS = {"fused": {"fuse_projections": True}, "fp32": {"compute_dtype": "float32"},
          "bf16-auto": {"compute_dtype": "auto"}}


def env(cache: Path) -> dict:
    return {**os.environ, "PEER_CACHE": str(cache), "PYTHONPATH": str(ROOT / "src")}


PEER_BF16 = ROOT / "benchmarks" / "peers" / "peer_bf16.py"  # the same peer with bf16=True (its docstring)


def run_peer(script: Path, args: list[str], cache: Path, bf16: bool = False) -> dict:
    cmd = [sys.executable, *([str(PEER_BF16)] if bf16 else []), str(script), *args]
    proc = subprocess.run(cmd, env=env(cache), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"peer {script.name} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), **({"bf16": True} if bf16 else {})}


def run_tunelab(cfg: dict, out: Path, cache: Path) -> dict:
    """`tunelab train` on `cfg` in a child that reports its own peak RSS; the loop's figures from the run dir."""
    import yaml

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(out), "overwrite": True, **cfg}))
    code = ("import resource, sys; from tunelab.cli import main; rc = main(['train', sys.argv[1]]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env(cache), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"tunelab failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "step_seconds" in r]
    res = json.loads((out / "results.json").read_text())
    return {"system": "tunelab", "steps": res["steps"], "train_seconds": round(res["train_seconds"], 3),
            "input_tokens": res["train_tokens"], "tokens_per_s": round(res["tokens_per_s"], 2),
            "peak_rss_mb": round(int(proc.stdout.split("PEAK_RSS_KB")[-1].split()[0]) / 1024, 1),
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
            "step_seconds_median": round(sorted(r["step_seconds"] for r in steps)[len(steps) // 2], 3),
            "compute_dtype": res.get("compute_dtype")}


def sft_config(data: Path, steps: int, full: bool = False, **train) -> dict:
    """The peer_sft.py workload in tunelab terms (its data file, same model, same hyper-parameters)."""
    return {"method": "full" if full else "lora", "objective": "sft",
            "model": {"name": "smollm2-135m", "dtype": "float32"},
            "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 512, "masking": "prompt"},
            **({} if full else {"lora": LORA}),
            "train": {"max_steps": steps, "batch_size": 8, "lr": 2e-5 if full else 2e-4, "scheduler": "linear",
                      "warmup_steps": 0, "max_grad_norm": 1.0, "seed": 42, **train},
            "samples": {"n_heldout": 0, "prompts": []}}


def dpo_config(data: Path, steps: int) -> dict:
    """peer_dpo.py's workload: 4 pairs per step, β 0.1 sigmoid, LoRA, lr 5e-5, reference log-probs precomputed."""
    return {"method": "lora", "objective": "dpo", "model": {"name": "smollm2-135m", "dtype": "float32"},
            "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 512}, "lora": LORA,
            "dpo": {"beta": 0.1, "loss": "sigmoid"}, "pref": {"probe": 0}, "reference": {"precompute": True},
            "train": {"max_steps": steps, "batch_size": 4, "lr": 5e-5, "scheduler": "linear",
                      "warmup_steps": 0, "max_grad_norm": 1.0, "seed": 42},
            "samples": {"n_heldout": 0, "prompts": []}}


def mfu(res: dict, full: bool, ceiling: float) -> float | None:
    if not res or not res.get("tokens_per_s"):
        return None
    return round((6 if full else 4) * N_PARAMS * res["tokens_per_s"] / 1e9 / ceiling, 4)


def ratios(mine: dict, peer: dict) -> dict:
    if not peer:
        return {}
    return {"tokens_per_s": round(mine["tokens_per_s"] / peer["tokens_per_s"], 2),
            "peak_rss": round(mine["peak_rss_mb"] / peer["peak_rss_mb"], 3)}


# ------------------------------------------------------------------------------------------------ workloads
def sft(name: str, args, cache: Path) -> dict:
    full = name == "sft-full"
    peer = None if args.skip_peer else run_peer(PEERS / "peer_sft.py", ["--steps", str(args.steps)] +
                                                (["--full"] if full else []), cache)
    data = cache / "peer_bench" / "gsm_symbolic_seed42_n512.jsonl"  # written by the peer's preparation
    extra = {"memory_mode": True} if name == "sft-memory" else {}
    mine = run_tunelab(sft_config(data, args.steps, full, **extra), ROOT / "runs" / f"bench_{name}", cache)
    report = {"tunelab": mine, "peer": peer, "ratios": ratios(mine, peer)}
    if args.peer_bf16:
        report["peer_bf16"] = run_peer(PEERS / "peer_sft.py", ["--steps", str(args.steps)] +
                                       (["--full"] if full else []), cache, bf16=True)
    for lever in args.levers:
        if lever == "fused" and full:
            continue  # no LoRA projections to fuse
        if lever == "fp32" and name == "sft-memory":
            continue  # memory mode's auto is fp32 already (models/precision.py)
        res = run_tunelab(sft_config(data, args.steps, full, **extra, **LEVERS[lever]),
                          ROOT / "runs" / f"bench_{name}_{lever}", cache)
        report.setdefault("levers", {})[lever] = {"tunelab": res, "ratios": ratios(res, peer)}
    add_bf16_ratios(report, ratios)
    if name == "sft-memory":
        curve = {}
        for length in args.curve:
            cfg = sft_config(data, 2, memory_mode=True, batch_size=1)
            cfg["data"]["max_length"] = length
            curve[length] = run_tunelab(cfg, ROOT / "runs" / f"bench_memory_{length}", cache)["peak_rss_mb"]
        report["peak_rss_mb_by_max_length"] = curve
    return report


def dpo(args, cache: Path) -> dict:
    script = ROOT / "benchmarks" / "peers" / "peer_dpo.py"
    peer = None if args.skip_peer else run_peer(script, ["--steps", str(args.steps)], cache)
    data = cache / "peer_bench" / "gsm_symbolic_seed42_n256_pairs.jsonl"  # conversational pairs, read as-is
    cfg = dpo_config(data, args.steps)
    mine = run_tunelab(cfg, ROOT / "runs" / "bench_dpo", cache)
    report = {"tunelab": mine, "peer": peer, "ratios": ratios(mine, peer)}
    if args.peer_bf16:
        report["peer_bf16"] = run_peer(script, ["--steps", str(args.steps)], cache, bf16=True)
    for lever in args.levers:
        lcfg = dpo_config(data, args.steps)
        lcfg["train"].update(LEVERS[lever])
        res = run_tunelab(lcfg, ROOT / "runs" / f"bench_dpo_{lever}", cache)
        report.setdefault("levers", {})[lever] = {"tunelab": res, "ratios": ratios(res, peer)}
    add_bf16_ratios(report, ratios)
    return report


def add_bf16_ratios(report: dict, ratio_fn) -> None:
    """With `--peer-bf16`: every tunelab row's ratios against the bf16 peer too (`ratios_vs_peer_bf16`)."""
    peer = report.get("peer_bf16")
    if not peer:
        return
    report["ratios_vs_peer_bf16"] = ratio_fn(report["tunelab"], peer)
    for v in (report.get("levers") or {}).values():
        v["ratios_vs_peer_bf16"] = ratio_fn(v["tunelab"], peer)


def grpo(args, cache: Path) -> dict:
    import grpo_vs_trl as g

    peer = None if args.skip_peer else g.run_peer(PEERS / "peer_grpo.py", args.steps, cache)
    out = ROOT / "runs" / "bench_grpo"
    data = cache / "peer_bench" / "gsm_symbolic_seed7_n64_grpo.jsonl"
    mine = g.run_tunelab(g.tunelab_config(data, out, args.steps), out)
    report = {"tunelab": mine, "peer": peer, "ratios": grpo_ratios(mine, peer)}
    if args.peer_bf16:
        report["peer_bf16"] = {**g.run_peer(PEERS / "peer_grpo.py", args.steps, cache, prefix=[str(PEER_BF16)]),
                               "bf16": True}
    for lever in args.levers:
        lout = ROOT / "runs" / f"bench_grpo_{lever}"
        res = g.run_tunelab(g.tunelab_config(data, lout, args.steps, train=LEVERS[lever]), lout)
        report.setdefault("levers", {})[lever] = {"tunelab": res, "ratios": grpo_ratios(res, peer)}
    add_bf16_ratios(report, grpo_ratios)
    return report


def grpo_ratios(mine: dict, peer: dict | None) -> dict:
    if not peer:
        return {}
    return {"step_time_speedup": round(peer["seconds_per_step_median"] / mine["seconds_per_step_median"], 2),
            "peak_rss": round(mine["peak_rss_mb"] / peer["peak_rss_mb"], 3)}


def data_memory(args, cache: Path) -> dict:
    """RSS before step 1 (and tensor bytes the source holds) for 1k vs 10k records, lazy vs the old eager epoch."""
    out = {}
    for eager in (False, True):
        for n in (1000, 10000):
            proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_memory.py"), str(n)] +
                                  (["--eager"] if eager else []), env=env(cache), capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"data_memory.py failed:\n{proc.stderr[-2000:]}")
            out[f"{'eager' if eager else 'lazy'}_{n}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def machine(ceilings: dict | None) -> dict:
    """Where the run happened (facts.machine_facts): provenance, CPU flags, load and both matmul ceilings."""
    return machine_facts(ceilings)


def table(results: dict) -> str:
    lines = [f"{'workload':12s} {'system':8s} {'tok/s':>9s} {'peak RSS MB':>12s} {'MFU':>7s} {'loss first→last':>18s}"]
    for name, rep in results.items():
        if name == "data-memory":
            for k, v in rep.items():
                lines.append(f"{name:12s} {k:12s} rss_before_step1 {v['rss_mb']:>8.0f} MB, source tensors "
                             f"{v['held_tensor_mb']:.1f} MB")
            continue
        for who in ("peer", "peer_bf16", "tunelab"):
            r = rep.get(who)
            if r:
                tps = r.get("tokens_per_s") or r.get("completion_tokens_per_s")
                loss = f"{r['first_loss']:.3f}→{r['last_loss']:.3f}" if r.get("first_loss") is not None else "—"
                lines.append(f"{name:12s} {who:9s} {tps:>9.1f} {r['peak_rss_mb']:>12.0f} "
                             f"{r.get('mfu') or 0:>7.3f} {loss:>18s}")
        if rep.get("ratios"):
            lines.append(f"{name:12s} {'ratio':9s} " + ", ".join(f"{k} {v}" for k, v in rep["ratios"].items()))
        if rep.get("ratios_vs_peer_bf16"):
            lines.append(f"{name:12s} {'ratio':9s} vs the bf16 peer: "
                         + ", ".join(f"{k} {v}" for k, v in rep["ratios_vs_peer_bf16"].items()))
        for lever, v in (rep.get("levers") or {}).items():
            r = v["tunelab"]
            tps = r.get("tokens_per_s") or r.get("completion_tokens_per_s")
            lines.append(f"{name:12s} +{lever:7s} {tps:>9.1f} {r['peak_rss_mb']:>12.0f} {r.get('mfu') or 0:>7.3f} "
                         + ", ".join(f"{k} {x}" for k, x in (v.get("ratios") or {}).items())
                         + "".join(f"; vs bf16 peer {k} {x}" for k, x in (v.get("ratios_vs_peer_bf16") or {}).items()))
        if rep.get("peak_rss_mb_by_max_length"):
            lines.append(f"{name:12s} curve    peak RSS MB by max_length: {rep['peak_rss_mb_by_max_length']}")
    return "\n".join(lines)


WORKLOADS = ("sft-lora", "sft-full", "sft-memory", "dpo", "grpo", "data-memory")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workloads", nargs="*", default=list(WORKLOADS[:5]), help=f"any of {', '.join(WORKLOADS)}")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per system (default 20; grpo 3)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 2 s ceiling, curve 256 and 1,024")
    ap.add_argument("--skip-peer", action="store_true", help="tunelab only (the peers' cached data must exist)")
    ap.add_argument("--levers", default="", help=f"comma-separated, each also run beside the default: "
                    f"{', '.join(LEVERS)} (make bench: fused,bf16-auto)")
    ap.add_argument("--peer-bf16", action="store_true", help="also run each peer with bf16=True "
                    "(peers/peer_bf16.py): the fair peer for tunelab's bf16 rows on a CPU where bf16 wins")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "peers")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.jsonl")
    args = ap.parse_args(argv)
    args.curve = [256, 1024] if args.quick else [256, 512, 1024, 2048, 4096]
    args.cache.mkdir(parents=True, exist_ok=True)
    args.levers = [x for x in args.levers.split(",") if x]
    unknown = [x for x in args.levers if x not in LEVERS]
    if unknown:
        sys.exit(f"unknown lever {unknown[0]!r}; choose from {', '.join(LEVERS)}")
    ceilings = matmul_ceilings(2.0 if args.quick else 10.0)
    ceiling = ceilings["fp32"]
    facts, results = machine(ceilings), {}
    if "bf16-auto" in args.levers:  # what `auto` decides here, and the measured ratio it decided on
        from tunelab.models.precision import bf16_speedup, resolve_compute_dtype

        facts["bf16_auto"] = {"speedup": round(bf16_speedup(refresh=True), 3),
                              "picks": str(resolve_compute_dtype("auto", "cpu") or "torch.float32")}
    print(describe_machine(facts), flush=True)
    for name in args.workloads:
        if name not in WORKLOADS:
            sys.exit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
        steps = args.steps or (2 if args.quick else 3 if name == "grpo" else 20)
        args_n = argparse.Namespace(**{**vars(args), "steps": steps})
        t0 = time.perf_counter()
        if name.startswith("sft"):
            rep = sft(name, args_n, args.cache)
        elif name == "dpo":
            rep = dpo(args_n, args.cache)
        elif name == "grpo":
            rep = grpo(args_n, args.cache)
        else:
            rep = data_memory(args_n, args.cache)
        for r in ([rep.get("peer"), rep.get("peer_bf16"), rep.get("tunelab")]
                  + [v["tunelab"] for v in (rep.get("levers") or {}).values()]):
            if isinstance(r, dict) and "tokens_per_s" in r:  # MFU against the ceiling of the dtype it computed in
                bf16 = r.get("bf16") or r.get("compute_dtype") == "bfloat16"
                r["mfu"] = mfu(r, name == "sft-full", ceilings["bf16"] if bf16 and ceilings.get("bf16") else ceiling)
        rep = build_row(name, rep, steps=steps, wall_seconds=time.perf_counter() - t0, facts=facts, quick=args.quick)
        results[name] = rep
        with open(args.results, "a") as f:
            f.write(json.dumps(rep) + "\n")
    print(describe_machine(facts))
    print(table(results))
    print(goals_report(results))


if __name__ == "__main__":
    main()

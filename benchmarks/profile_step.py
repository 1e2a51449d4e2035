#!/usr/bin/env python
"""Where a training step's time and memory go: `torch.profiler` over tunelab's real loop on a `run.py` workload.

    PYTHONPATH=src .venv/bin/python benchmarks/profile_step.py [--workload sft-lora] [--steps 2] [--warmup 2]

The run is `tunelab train` itself (`tunelab.train.run.run`, stopped after warmup + steps + 1 optimizer steps) on
the config `benchmarks/run.py` builds for the workload (`sft_config` / `dpo_config`: same data file, model, LoRA,
batch and seed). Nothing in the loop knows it is profiled: a global optimizer-step hook
(`torch.optim.optimizer.register_optimizer_step_post_hook`) starts the profiler after the `warmup`-th step and
stops it `steps` steps later (`record_shapes=True, profile_memory=True`); one more step is then recorded with
Python stacks (which the memory categorisation needs and which would distort the times) for the peak-memory
breakdown by category (parameters, gradients, optimizer state, activations, temporaries, …). `--no-timeline`
skips that step.

Prints a markdown report (top ops by self CPU time and by memory, time shares by kind of op, the peak-memory
breakdown) and writes it with the raw figures to `runs/profile/<workload>.md` / `.json`. Absolute times mean
something only on a quiet machine; the shares are steadier.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import run as bench  # noqa: E402  (benchmarks/run.py: the workloads' configs)

WORKLOADS = ("sft-lora", "sft-full", "sft-memory", "dpo")
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::addmv",
          "aten::mv", "aten::dot", "aten::_addmm_activation"}
MOVE = {"aten::copy_", "aten::fill_", "aten::zero_", "aten::cat", "aten::clone", "aten::_to_copy", "aten::empty",
        "aten::empty_like", "aten::empty_strided", "aten::zeros", "aten::zeros_like", "aten::ones", "aten::ones_like",
        "aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::index_select", "aten::gather",
        "aten::scatter", "aten::scatter_add_", "aten::contiguous", "aten::new_zeros", "aten::new_empty_strided",
        "aten::embedding_dense_backward", "aten::embedding", "aten::nonzero", "aten::masked_fill_"}
POINTWISE = ("add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "silu", "sigmoid", "tanh",
             "where", "addcmul", "addcdiv", "lerp", "clamp", "maximum", "minimum", "threshold", "gelu", "relu",
             "reciprocal", "sign", "abs", "eq", "ne", "lt", "gt", "ge", "le", "bitwise", "logical", "rsub", "sgn")
# torch.profiler's memory categories, in the order of its timeline's columns (after one unused column)
CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail",
              "unknown")


def kind(name: str) -> str:
    """matmul, attention, elementwise (pointwise math, the optimizer's _foreach_ ops included), copy/fill
    (memory movement and allocation), or other (reductions, losses, autograd bookkeeping, Python, …)."""
    if name in MATMUL:
        return "matmul"
    if "attention" in name or "scaled_dot_product" in name:
        return "attention"
    if name in MOVE:
        return "copy/fill"
    op = name.removeprefix("aten::").removeprefix("_foreach_").rstrip("_")
    if name.startswith("aten::") and (op in POINTWISE or op.removesuffix("_backward") in POINTWISE):
        return "elementwise"
    return "other"


def workload_config(name: str, steps: int, cache: Path) -> dict:
    data = cache / "peer_bench" / ("gsm_symbolic_seed42_n256_pairs.jsonl" if name == "dpo"
                                   else "gsm_symbolic_seed42_n512.jsonl")
    if not data.exists():
        raise SystemExit(f"{data} is missing: run `benchmarks/run.py {name} --quick` once (the peer writes it)")
    if name == "dpo":
        cfg = bench.dpo_config(data, steps)
        # the reference log-probs are precomputed for every pair before step 1: only the profiled ones
        cfg["data"]["limit"] = steps * cfg["train"]["batch_size"]
        return cfg
    extra = {"memory_mode": True} if name == "sft-memory" else {}
    return bench.sft_config(data, steps, name == "sft-full", **extra)


def run_config(workload: str, steps: int, cache: Path, overrides: list[str] = ()):
    """The workload's RunConfig for `steps` optimizer steps, with `key=value` overrides as `tunelab train` takes."""
    from tunelab.config import parse_override
    from tunelab.objectives import run_config_schema

    raw = {"output_dir": str(ROOT / "runs" / f"profile_{workload}"), "overwrite": True,
           **workload_config(workload, steps, cache)}
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return run_config_schema().model_validate(raw)


class Window:
    """Profiles optimizer steps warmup+1 … warmup+steps (times, per-op memory), then one more with stacks.

    The times profile is summarised (`summary`) and released as soon as it stops, before the stack-recording
    profiler starts: a times profile still alive after the stacked one had exported its memory timeline crashed
    the interpreter when it was freed (torch 2.13: SIGSEGV in about 1 run in 4 of a 3-layer MLP, at exit; 0 of 16
    with this order)."""

    def __init__(self, warmup: int, steps: int, timeline: bool, top: int):
        self.warmup, self.steps, self.top, self.done = warmup, steps, top, 0
        self.times = profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True)
        self.memory = profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True,
                              with_stack=True) if timeline else None
        self.seconds = None
        self.summary: dict = {}

    def __call__(self, optimizer, args, kwargs) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.times.start()
            self.t0 = time.perf_counter()
        elif self.done == self.warmup + self.steps:
            self.times.stop()
            self.seconds = time.perf_counter() - self.t0
            self.summary = summarise(self.times, self.top)
            self.times = None
            gc.collect()  # freed here, not at exit (the class docstring)
            if self.memory is not None:
                self.memory.start()
        elif self.done == self.warmup + self.steps + 1 and self.memory is not None:
            self.memory.stop()


def top_ops(prof, total_us: float, key: str, n: int) -> list[dict]:
    shapes = {}
    for e in prof.key_averages(group_by_input_shape=True):  # each op's costliest input shapes
        if e.key not in shapes or e.self_cpu_time_total > shapes[e.key][0]:
            shapes[e.key] = (e.self_cpu_time_total, str(e.input_shapes)[:80])
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"op": e.key, "kind": kind(e.key), "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
             "self_cpu_pct": round(100 * e.self_cpu_time_total / total_us, 1),
             "self_mem_mb": round(e.self_cpu_memory_usage / 2**20, 1), "top_shapes": shapes.get(e.key, (0, ""))[1]}
            for e in rows]


def summarise(prof, top: int) -> dict:
    total_us, share = shares(prof)
    return {"time_share_pct": share, "top_by_time": top_ops(prof, total_us, "self_cpu_time_total", top),
            "top_by_memory": top_ops(prof, total_us, "self_cpu_memory_usage", top)}


def shares(prof) -> tuple[float, dict]:
    by_kind: dict[str, float] = {}
    for e in prof.key_averages():
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + e.self_cpu_time_total
    total = sum(by_kind.values())
    return total, {k: round(100 * v / total, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}


def peak_breakdown(prof, out: Path) -> dict:
    """MB per memory category at the step's peak of tracked CPU memory (torch.profiler's memory timeline)."""
    path = out.with_suffix(".timeline.json")
    prof.export_memory_timeline(str(path), device="cpu")
    times, sizes = json.loads(path.read_text())
    if not sizes:
        return {}
    peak = max(range(len(sizes)), key=lambda i: sum(sizes[i][1:]))
    row = sizes[peak][1:]
    assert len(row) == len(CATEGORIES), "torch.profiler's memory categories changed"
    return {"total_mb": round(sum(row) / 2**20, 1),
            **{c: round(b / 2**20, 1) for c, b in sorted(zip(CATEGORIES, row), key=lambda cb: -cb[1]) if b}}


def markdown(rep: dict) -> str:
    lines = [f"## profile_step.py {rep['workload']}: {rep['steps']} profiled steps after {rep['warmup']} warm-up",
             "", f"{rep['seconds_per_step']:.2f} s per profiled step (profiler on); peak RSS "
             f"{rep['peak_rss_mb']:,.0f} MB; {rep['machine']}", "",
             "Self CPU time by kind of op: " + ", ".join(f"{k} {v} %" for k, v in rep["time_share_pct"].items()), ""]
    for title, key in (("by self CPU time", "top_by_time"), ("by memory (net MB the op itself allocated)",
                                                              "top_by_memory")):
        lines += [f"### Top {len(rep[key])} ops {title}", "",
                  "| op | kind | calls | self CPU ms | % | self MB | costliest input shapes |", "|---|---|---|---|---|---|---|"]
        lines += [f"| `{r['op']}` | {r['kind']} | {r['calls']} | {r['self_cpu_ms']} | {r['self_cpu_pct']} | "
                  f"{r['self_mem_mb']} | {r['top_shapes'].replace('|', '/')} |" for r in rep[key]]
        lines.append("")
    if rep.get("peak_memory_mb"):
        lines += ["### Peak of tracked CPU memory in one step, by category (MB)", "",
                  "| " + " | ".join(rep["peak_memory_mb"]) + " |", "|" + "---|" * len(rep["peak_memory_mb"]),
                  "| " + " | ".join(str(v) for v in rep["peak_memory_mb"].values()) + " |", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=WORKLOADS, default="sft-lora")
    ap.add_argument("--steps", type=int, default=2, help="profiled optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="unprofiled optimizer steps first (at least 1)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-timeline", action="store_true", help="skip the extra step for the peak-memory breakdown")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "peers")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "profile")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, as `tunelab train` takes them (e.g. train.compile=true)")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        sys.exit("--warmup and --steps must be at least 1")
    from tunelab.train.run import run

    total = args.warmup + args.steps + (0 if args.no_timeline else 1)
    cfg = run_config(args.workload, total, args.cache, args.set)
    window = Window(args.warmup, args.steps, not args.no_timeline, args.top)
    handle = register_optimizer_step_post_hook(window)
    try:
        run(cfg, stop_after=total)
    finally:
        handle.remove()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / args.workload
    if window.seconds is None:
        sys.exit(f"the run stopped before optimizer step {args.warmup + args.steps}: nothing was profiled")
    facts = bench.machine(None)
    rep = {"workload": args.workload, "warmup": args.warmup, "steps": args.steps, "overrides": args.set,
           "seconds_per_step": window.seconds / args.steps,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "machine": bench.describe_machine(facts), "machine_facts": facts,
           **window.summary,
           "peak_memory_mb": peak_breakdown(window.memory, out) if window.memory is not None else {}}
    text = markdown(rep)
    out.with_suffix(".json").write_text(json.dumps(rep, indent=1))
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

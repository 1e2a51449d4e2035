"""The side-by-side harness (benchmarks/run.py) builds tunelab configs that the schema accepts and that match
the peer's workload — so a benchmark on a quiet machine is not lost to a typo. No training here, except two
optimizer steps of a tiny model under benchmarks/profile_step.py."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.objectives import run_config_schema

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sft_configs_validate_and_match_the_peer_workload(tmp_path):
    run = _harness()
    for full, memory in ((False, False), (True, False), (False, True)):
        extra = {"memory_mode": True} if memory else {}
        cfg = run_config_schema().model_validate(json.loads(json.dumps(
            {"output_dir": str(tmp_path), **run.sft_config(tmp_path / "d.jsonl", 20, full, **extra)})))
        assert cfg.train.batch_size == 8 and cfg.data.max_length == 512 and cfg.train.seed == 42
        assert cfg.train.scheduler == "linear" and cfg.train.warmup_steps == 0 and cfg.data.packing
        assert cfg.train.lr == (2e-5 if full else 2e-4) and cfg.train.memory_mode is memory
        if not full:
            assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and len(cfg.lora.target_modules) == 7
    yaml.safe_dump(run.sft_config(tmp_path / "d.jsonl", 2))  # what run_tunelab writes
    dpo = run_config_schema().model_validate({"output_dir": str(tmp_path), **run.dpo_config(tmp_path / "p.jsonl", 10)})
    assert dpo.objective == "dpo" and dpo.reference.precompute and dpo.dpo.beta == 0.1


def test_ratios_and_mfu():
    run = _harness()
    mine, peer = {"tokens_per_s": 300.0, "peak_rss_mb": 2000.0}, {"tokens_per_s": 100.0, "peak_rss_mb": 10000.0}
    assert run.ratios(mine, peer) == {"tokens_per_s": 3.0, "peak_rss": 0.2}
    assert run.mfu({"tokens_per_s": 100.0}, False, 272.0) == round(4 * run.N_PARAMS * 100 / 1e9 / 272, 4)


def test_profile_step_builds_each_workload_and_sorts_ops(tmp_path):
    """benchmarks/profile_step.py: the workloads' configs (run.py's, overrides applied) and its kinds of op."""
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_step.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    (tmp_path / "peer_bench").mkdir()
    for name in ("gsm_symbolic_seed42_n512.jsonl", "gsm_symbolic_seed42_n256_pairs.jsonl"):
        (tmp_path / "peer_bench" / name).write_text("")
    for workload in prof.WORKLOADS:
        cfg = prof.run_config(workload, 5, tmp_path, ["train.compile=true"])
        assert cfg.train.max_steps == 5 and cfg.train.compile
        assert cfg.train.memory_mode is (workload == "sft-memory")
        assert cfg.method == ("full" if workload == "sft-full" else "lora")
    assert prof.run_config("dpo", 5, tmp_path).data.limit == 20  # reference log-probs for the profiled pairs only
    kinds = {op: prof.kind(op) for op in ("aten::mm", "aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                          "aten::mul", "aten::add_", "aten::silu_backward", "aten::_foreach_mul_",
                                          "aten::copy_", "aten::fill_", "aten::_log_softmax", "MmBackward0")}
    assert kinds == {"aten::mm": "matmul", "aten::addmm": "matmul",
                     "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::mul": "elementwise",
                     "aten::add_": "elementwise", "aten::silu_backward": "elementwise",
                     "aten::_foreach_mul_": "elementwise", "aten::copy_": "copy/fill", "aten::fill_": "copy/fill",
                     "aten::_log_softmax": "other", "MmBackward0": "other"}


def test_every_row_names_its_machine_and_both_ceilings(monkeypatch):
    """facts.build_row on a fake measurement: the row carries the CPU model, the flags that matter, cores, torch's
    CPU capability, versions, and the fp32 and bf16 matmul ceilings (no benchmark runs)."""
    run = _harness()
    facts_mod = __import__("facts")  # benchmarks/ is on sys.path once run.py is loaded
    from tunelab import machine as tm

    monkeypatch.setattr(tm, "machine", lambda: {"cpu": "AMD EPYC 9R14", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"],
                                                "cores": 2, "ram_gb": 7.8, "torch_cpu_capability": "AVX512",
                                                "gpu": None, "os": "Linux"})
    facts = run.machine({"fp32": 271.96, "bf16": 1520.04})
    rep = {"tunelab": {"tokens_per_s": 300.0, "peak_rss_mb": 2000.0}, "peer": {"tokens_per_s": 100.0,
                                                                               "peak_rss_mb": 10000.0}}
    rep["ratios"] = run.ratios(rep["tunelab"], rep["peer"])
    row = facts_mod.build_row("sft-lora", rep, steps=20, wall_seconds=12.34, facts=facts, quick=False)
    json.dumps(row)  # what results.jsonl gets
    m = row["machine"]
    assert m["cpu"] == "AMD EPYC 9R14" and m["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16"] and m["cores"] == 2
    assert m["torch_cpu_capability"] == "AVX512" and m["torch"] and "transformers" in m and "peft" in m
    assert m["matmul_fp32_gflops"] == 272.0 and m["matmul_bf16_gflops"] == 1520.0
    assert row["workload"] == "sft-lora" and row["steps"] == 20 and row["wall_seconds"] == 12.3
    line = facts_mod.describe_machine(m)
    assert "AMD EPYC 9R14" in line and "avx512_bf16" in line and "fp32 272.0" in line and "bf16 1520.0" in line


def test_the_ceiling_is_measured_in_both_dtypes():
    import torch

    run = _harness()
    seen = []
    real = torch.mm
    torch.mm = lambda a, b, out=None: seen.append(a.dtype) or real(a, b, out=out)
    try:
        ceilings = __import__("facts").matmul_ceilings(0.0)
    finally:
        torch.mm = real
    assert set(ceilings) == {"fp32", "bf16"} and all(v > 0 for v in ceilings.values())
    assert torch.float32 in seen and torch.bfloat16 in seen
    assert run.matmul_ceiling is __import__("facts").matmul_ceiling


def test_goals_are_judged_for_the_default_and_each_lever():
    facts = (_harness(), __import__("facts"))[1]
    results = {"sft-lora": {"ratios": {"tokens_per_s": 2.6, "peak_rss": 1.3},
                            "levers": {"fused": {"ratios": {"tokens_per_s": 2.4, "peak_rss": 1.3}}}},
               "sft-memory": {"ratios": {"tokens_per_s": 1.86, "peak_rss": 0.22}},
               "grpo": {"ratios": {"step_time_speedup": 3.1, "peak_rss": 0.4}},
               "sft-full": {"ratios": {}}}
    text = facts.goals_report(results)
    lines = text.splitlines()
    assert any("LoRA SFT" in ln and "[default] 2.6× tokens/s: MET" in ln for ln in lines)
    assert any("LoRA SFT" in ln and "[fused] 2.4× tokens/s: NOT MET" in ln for ln in lines)
    assert any("memory mode" in ln and "0.22× peak RSS at 1.86× tokens/s: NOT MET" in ln for ln in lines)
    assert any("GRPO" in ln and "3.1× seconds/step: MET" in ln for ln in lines)
    assert any("full finetuning" in ln and "not judged" in ln for ln in lines)
    assert facts.goal_verdict("sft-memory", {"tokens_per_s": 1.5, "peak_rss": 0.2}) == (
        "0.2× peak RSS at 1.5× tokens/s", True)
    run = _harness()  # the printed table shows a lever's run on its own line, beside the default's
    r = {"tokens_per_s": 250.0, "peak_rss_mb": 9000.0, "first_loss": 1.2, "last_loss": 1.1, "mfu": 0.4}
    table = run.table({"sft-lora": {"tunelab": r, "peer": {**r, "tokens_per_s": 100.0}, "ratios": {"tokens_per_s": 2.5},
                                    "levers": {"bf16-auto": {"tunelab": {**r, "tokens_per_s": 300.0},
                                                             "ratios": {"tokens_per_s": 3.0}}}}})
    assert "+bf16-auto" in table and "300.0" in table and "tokens_per_s 3.0" in table


def test_levers_are_valid_train_settings(tmp_path):
    run = _harness()
    for settings in run.LEVERS.values():
        cfg = run_config_schema().model_validate(
            {"output_dir": str(tmp_path), **run.sft_config(tmp_path / "d.jsonl", 2, **settings)})
        for k, v in settings.items():
            assert getattr(cfg.train, k) == v
    import grpo_vs_trl

    path = grpo_vs_trl.tunelab_config(tmp_path / "p.jsonl", tmp_path / "g", 2, train=run.LEVERS["fused"])
    assert yaml.safe_load(path.read_text())["train"]["fuse_projections"] is True


def test_peer_bf16_wrapper_turns_bf16_on_in_every_training_arguments(tmp_path):
    """peers/peer_bf16.py runs a peer unchanged except bf16=True (the peers pin bf16=False), args passed through."""
    import subprocess
    import sys

    script = tmp_path / "peer.py"
    script.write_text("import sys, transformers\n"
                      f"a = transformers.TrainingArguments(output_dir={str(tmp_path / 'o')!r}, bf16=False, "
                      "use_cpu=True, report_to='none')\n"
                      "print(a.bf16, a.fp16, sys.argv[1:])\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers" / "peer_bf16.py"), str(script), "--steps",
                          "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True False ['--steps', '3']"


def test_ratios_against_the_bf16_peer_are_judged_beside_the_fp32_peer():
    run = _harness()
    import facts

    rep = {"tunelab": {"tokens_per_s": 300.0, "peak_rss_mb": 2000.0},
           "peer": {"tokens_per_s": 100.0, "peak_rss_mb": 10000.0},
           "peer_bf16": {"tokens_per_s": 200.0, "peak_rss_mb": 8000.0, "bf16": True},
           "levers": {"bf16-auto": {"tunelab": {"tokens_per_s": 500.0, "peak_rss_mb": 1600.0}}}}
    rep["ratios"] = run.ratios(rep["tunelab"], rep["peer"])
    run.add_bf16_ratios(rep, run.ratios)
    assert rep["ratios_vs_peer_bf16"] == {"tokens_per_s": 1.5, "peak_rss": 0.25}
    assert rep["levers"]["bf16-auto"]["ratios_vs_peer_bf16"] == {"tokens_per_s": 2.5, "peak_rss": 0.2}
    report = facts.goals_report({"sft-lora": rep})
    lines = {ln.split("[")[1].split("]")[0]: ln for ln in report.splitlines() if "[" in ln}
    assert "3.0× tokens/s: MET" in lines["default"] and "1.5× tokens/s: NOT MET" in lines["default vs bf16 peer"]
    assert "2.5× tokens/s: MET" in lines["bf16-auto vs bf16 peer"]


def test_profile_step_runs_a_tiny_model_end_to_end(tmp_path, tokenizer):
    """The profiler over the real loop, both windows (times, then the step with stacks), exits 0 with its report:
    it used to segfault when the times profile was freed after the stacked one's memory timeline (Window)."""
    from tests.helpers import save_tiny_model, write_jsonl

    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    (tmp_path / "peer_bench").mkdir()
    write_jsonl(tmp_path / "peer_bench" / "gsm_symbolic_seed42_n512.jsonl",
                [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                               {"role": "assistant", "content": f"{i} + {i} = {2 * i}. The answer is {2 * i}."}]}
                 for i in range(24)])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--steps", "1", "--warmup",
                           "1", "--cache", str(tmp_path), "--out", str(tmp_path / "out"), "--set",
                           f"model.name={model}", "data.max_length=64", f"output_dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads((tmp_path / "out" / "sft-lora.json").read_text())
    assert rep["top_by_time"] and sum(rep["time_share_pct"].values()) == pytest.approx(100, abs=0.5)
    assert rep["peak_memory_mb"]["total_mb"] > 0 and rep["seconds_per_step"] > 0
    assert "### Peak of tracked CPU memory" in (tmp_path / "out" / "sft-lora.md").read_text()

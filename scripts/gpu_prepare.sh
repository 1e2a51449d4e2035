#!/usr/bin/env bash
# Run HERE (the CPU machine), before a GPU session: puts into .gpu/ (ignored by git, carried to the device machine
# with `carry: [".gpu"]`) what the GPU image lacks, so that the session's minutes go to measuring:
#   .gpu/whl/        wheels for the device's Python 3.12 (manylinux x86-64), no deps, pinned to requirements.lock:
#                    tunelab's runtime dependencies the image does not ship (pydantic & co., gguf, datasets & co.),
#                    transformers/peft at the versions the tests run (the image has transformers 5.17), and trl for
#                    gpu_llama8b.py's peer;
#   .gpu/tokenizer/  the SmolLM2 tokenizer (the offline model's GGUF is too large to carry; the GPU checks build
#                    random-init models and need only a tokenizer).
# Then, on the device: `bash scripts/gpu_session.sh` (one prepared script; see its header).
#
#   scripts/gpu_prepare.sh            # PY=.venv/bin/python; ~1 minute with pip's cache warm
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# what the device's image lacks, at the versions requirements.lock pins (tests/test_gpu_scripts.py checks the
# list against the import closure of what the GPU scripts run)
WHEELS=(pydantic pydantic_core annotated-types typing-inspection typing_extensions gguf datasets dill multiprocess transformers
        peft trl)
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl
pins=()
for name in "${WHEELS[@]}"; do
  pin=$(grep -i -E "^${name//-/[-_]}==" requirements.lock | head -1)
  [ -n "$pin" ] || { echo "gpu_prepare: $name is not pinned in requirements.lock" >&2; exit 2; }
  pins+=("$pin")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl "${pins[@]}"
PYTHONPATH=src $PY -c "from tunelab.models.load import load_tokenizer; load_tokenizer('smollm2-135m').save_pretrained('.gpu/tokenizer')"
size=$(du -sm .gpu | cut -f1)
echo "gpu_prepare: .gpu/ holds ${#pins[@]} wheels and the tokenizer, ${size} MiB (the device carries at most 64 MiB with the tree)"
[ "$size" -lt 56 ] || { echo "gpu_prepare: .gpu/ is too large to carry" >&2; exit 1; }

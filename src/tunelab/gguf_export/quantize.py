"""GGUF tensor types: which ones tunelab writes itself, which ones llama.cpp's quantizer makes, and the rules for
which tensor gets which type.

**Written here** (`NATIVE`), with the `gguf` package's own block quantizers (`gguf.quants.quantize`, the numpy
port of ggml's reference code: same blocks, same rounding): f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0. A
q4_0 block is 32 weights sharing one f16 scale d = max|w|/-8 (signed absolute maximum), each stored as a 4-bit
round(w/d)+8; q4_1 stores a scale and a minimum; q5_* one more bit; q8_0 8 bits, d = max|w|/127. The rules are
llama.cpp's (`llama_tensor_get_type` in llama-quant.cpp, and `convert_hf_to_gguf.py` for f32…q8_0):

* 1-D tensors (norms, biases) and `*_norm.weight` stay f32;
* a tensor whose rows are not a multiple of the block size (32) is written f16;
* the output matrix (`output.weight`, or `token_embd.weight` when the embeddings are tied and it serves as the
  output too) is kept at higher precision in the 4/5-bit types: llama.cpp makes it q6_k, a k-quant `gguf` cannot
  write, so it is written q8_0 — what llama.cpp itself uses for that tensor when q6_k does not fit its rows;
* every other matrix, untied `token_embd.weight` included, gets the requested type.

**Made by llama.cpp** (`LLAMACPP`: the k-quants q2_k … q6_k, whose super-blocks of 256 weights with 6-bit
sub-block scales are chosen by an iterative search only llama.cpp implements): tunelab writes an f16 GGUF and
runs llama.cpp's quantizer on it — the `llama-quantize` program (`$LLAMA_QUANTIZE`, else on PATH), else
llama-cpp-python's `llama_model_quantize` — into a temporary name renamed into place. `find_quantizer` looks for
one before any work, so a machine without either gets one line saying how to get one, and no file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import TunelabError

NATIVE = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# --type name -> llama.cpp's ftype name (gguf.LlamaFileType member, and llama-quantize's type argument)
LLAMACPP = {"q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S", "q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S",
            "q3_k_l": "Q3_K_L", "q3_k_m": "Q3_K_M", "q3_k_s": "Q3_K_S", "q2_k": "Q2_K"}
QTYPES = NATIVE + tuple(LLAMACPP)
SMALL = ("q4_1", "q4_0", "q5_1", "q5_0")  # types whose output matrix llama.cpp keeps at higher precision


def check_qtype(qtype: str) -> None:
    if qtype not in QTYPES:
        raise TunelabError(f"gguf export: --type {qtype!r} is unknown; choose from {', '.join(QTYPES)}")


def file_type(qtype: str):
    """The `general.file_type` (gguf.LlamaFileType) of a file of this --type."""
    import gguf

    f = gguf.LlamaFileType
    if qtype == "f32":
        return f.ALL_F32
    return getattr(f, "MOSTLY_" + LLAMACPP.get(qtype, qtype.upper()))


def tensor_type(name: str, ndim: int, qtype: str, tied: bool):
    """GGMLQuantizationType llama.cpp would give tensor `name` in a file of type `qtype` (native types only)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if ndim <= 1 or name.endswith("_norm.weight"):
        return q.F32
    if qtype in SMALL and (name == "output.weight" or (tied and name == "token_embd.weight")):
        return q.Q8_0
    return getattr(q, qtype.upper())


def encode_tensor(name: str, data, qtype: str, tied: bool = False):
    """(bytes-or-floats ndarray, GGMLQuantizationType) of one float32 numpy tensor by the rules above; a
    quantized type whose blocks do not fit the rows falls back to f16."""
    import gguf

    target = tensor_type(name, data.ndim, qtype, tied)
    try:
        return gguf.quants.quantize(data, target), target
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def find_quantizer(qtype: str) -> tuple[str, str | None]:
    """("binary", path) of llama-quantize, or ("python", None) for llama-cpp-python; one line when neither."""
    env = os.environ.get("LLAMA_QUANTIZE")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise TunelabError(f"gguf export: LLAMA_QUANTIZE={env} is not an executable file")
        return "binary", env
    found = shutil.which("llama-quantize")
    if found:
        return "binary", found
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # not installed, or a build whose shared library does not load
        raise TunelabError(
            f"gguf export: {qtype} needs llama.cpp's quantizer: install llama-cpp-python (pip install "
            f"llama-cpp-python) or put llama-quantize on PATH (or set LLAMA_QUANTIZE); "
            f"{', '.join(NATIVE)} work without it") from None
    return "python", None


def run_quantizer(quantizer: tuple[str, str | None], src: Path, dst: Path, qtype: str) -> None:
    """llama.cpp quantizes the GGUF `src` to `dst` as `qtype`; its failure is one line with its last words."""
    kind, path = quantizer
    ftype = LLAMACPP[qtype]
    if kind == "binary":
        try:
            done = subprocess.run([path, str(src), str(dst), ftype], capture_output=True, text=True,
                                  errors="replace")
        except OSError as e:
            raise TunelabError(f"gguf export: cannot run {path} ({e.strerror or e})") from None
        if done.returncode != 0:
            lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).splitlines() if ln.strip()]
            last = next((ln for ln in reversed(lines) if "error" in ln.lower() or "fail" in ln.lower()),
                        lines[-1] if lines else "no output")
            raise TunelabError(f"gguf export: {path} {ftype} failed (exit {done.returncode}): {last}")
    else:
        import contextlib
        import ctypes
        import io

        import llama_cpp

        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(file_type(qtype))
        log = io.StringIO()  # llama-cpp-python routes llama.cpp's log (a line per tensor) through sys.stderr
        with contextlib.redirect_stderr(log):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            last = next((ln.strip() for ln in reversed(log.getvalue().splitlines()) if ln.strip()), "no log")
            raise TunelabError(f"gguf export: llama-cpp-python's llama_model_quantize {ftype} failed (code {rc}): "
                               f"{last}")
    if not dst.is_file():
        raise TunelabError(f"gguf export: llama.cpp's quantizer reported success but wrote no {dst.name}")

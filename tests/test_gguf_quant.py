"""GGUF quantized types (tunelab.gguf_export.quantize): q4_0…q8_0 written by tunelab and read back by gguf-py within
each type's block error, with llama.cpp's per-tensor rules; the k-quants handed to llama.cpp's quantizer — a fake
`llama-quantize` on PATH shows the call and the final file; without any quantizer one line, exit 2, no file.
(A real llama.cpp q4_k_m quantization: tests/test_gguf_llamacpp.py.)"""

import os
import stat
import sys

import numpy as np
import pytest
import torch

from tests.test_gguf_export import _load_gguf, _logits, _model_dir, bpe_tokenizer  # noqa: F401  (fixture)
from tunelab.cli import main

# ggml's block formats, 32 weights a block sharing one scale d: q8_0 is symmetric, d = amax/127 (amax: the block's
# max |w|), values round(w/d)·d, so the error is ≤ d/2. q4_0 (q5_0) maps the *signed* max to -8 (-16): d = amax/8
# (amax/16), values -8..7 (-16..15)·d, so the error is ≤ d/2 except on the other sign, where a w beyond 7·d (15·d)
# is clipped to it. The scale is stored as f16 (relative error ≤ 2^-11): up to amax·2^-11 more.
LEVELS = {"q4_0": (8, True), "q5_0": (16, True), "q8_0": (127, False)}


def _block_bound(w, qtype):
    """The worst |dequantized - w| ggml's format allows for each weight of `w` (rows of whole 32-blocks)."""
    blocks = np.abs(w.reshape(-1, 32))
    levels, asymmetric = LEVELS[qtype]
    amax = blocks.max(axis=1, keepdims=True)
    d = amax / levels
    bound = np.maximum(d / 2, blocks - (levels - 1) * d) if asymmetric else d / 2
    return bound + amax * 2 ** -11 + 1e-7


def _tensors(path):
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _original(model, gguf_name):
    """The float32 tensor written under `gguf_name` (GGUF's q/k rows permuted as the file holds them)."""
    from tunelab.gguf_export.arch import gguf_tensors

    return dict(gguf_tensors(model))[gguf_name].numpy()


@pytest.mark.parametrize("qtype", ["q4_0", "q5_0", "q8_0"])
def test_native_types_read_back_within_the_block_error(tmp_path, bpe_tokenizer, qtype):
    import gguf

    from tunelab.gguf_export import export_gguf
    from tunelab.models.load import load_model

    src = _model_dir(tmp_path / "m", bpe_tokenizer, "llama")
    out = export_gguf(src, tmp_path / f"m-{qtype}.gguf", qtype)
    model, _ = load_model(str(src), device="cpu")
    tensors = _tensors(out)
    Q, want = gguf.GGMLQuantizationType, getattr(gguf.GGMLQuantizationType, qtype.upper())
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == getattr(
        gguf.LlamaFileType, "MOSTLY_" + qtype.upper())
    types = {name: t.tensor_type for name, t in tensors.items()}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == Q.F32  # norms stay f32
    assert types["token_embd.weight"] == want  # untied: the requested type, as llama.cpp
    assert types["output.weight"] == Q.Q8_0  # llama.cpp's q6_k for the output matrix; q8_0 where q6_k cannot be
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        assert types[name] == want, name
        w = _original(model, name)
        got = gguf.quants.dequantize(tensors[name].data, want).reshape(w.shape)
        err, bound = np.abs(got - w).reshape(-1, 32), _block_bound(w, qtype)
        assert (err <= bound).all(), (name, float((err / bound).max()))
        assert err.max() > 0  # really quantized, not stored as floats
    assert os.path.getsize(out) < os.path.getsize(export_gguf(src, tmp_path / "m-f16.gguf", "f16"))


def test_q4_0_hand_computed_block():
    """q4_0 blocks by ggml's reference formula: d = (the signed max)/-8, q = min(15, int(w/d + 8.5)), stored as
    nibbles beside d in f16; read back as (q - 8)·f16(d)."""
    import gguf

    from tunelab.gguf_export.quantize import encode_tensor

    w = np.stack([np.linspace(-1.0, 0.55, 32), np.linspace(0.3, -0.2, 32)]).astype(np.float32)
    data, qt = encode_tensor("blk.0.attn_q.weight", w, "q4_0")
    assert qt == gguf.GGMLQuantizationType.Q4_0 and data.shape == (2, 18)  # 2-byte scale + 16 bytes of nibbles
    got = gguf.quants.dequantize(data, qt)
    for i, signed_max in enumerate((-1.0, 0.3)):
        d = np.float32(signed_max) / np.float32(-8)
        q = np.minimum(15, np.trunc(w[i] / d + np.float32(8.5)))
        assert np.array_equal(got[i], ((q - 8) * np.float32(np.float16(d))).astype(np.float32)), i
    assert got[0][0] == -1.0 and got[0][-1] == 0.5  # -8·0.125, and 0.55 rounded to 4·0.125


def test_tensor_rules_tied_and_misfit_rows(tmp_path):
    import gguf

    from tunelab.gguf_export.quantize import encode_tensor, tensor_type

    Q = gguf.GGMLQuantizationType
    assert tensor_type("token_embd.weight", 2, "q4_0", tied=True) == Q.Q8_0  # serves as the output matrix
    assert tensor_type("token_embd.weight", 2, "q4_0", tied=False) == Q.Q4_0
    assert tensor_type("output.weight", 2, "q8_0", tied=False) == Q.Q8_0
    assert tensor_type("output.weight", 2, "f16", tied=False) == Q.F16
    assert tensor_type("blk.0.attn_q.bias", 1, "q4_0", tied=False) == Q.F32
    _, qt = encode_tensor("blk.0.attn_q.weight", np.ones((4, 48), np.float32), "q4_0")
    assert qt == Q.F16  # rows of 48 are not whole 32-weight blocks: f16, as llama.cpp


def test_q4_0_logits_close_through_transformers(tmp_path, bpe_tokenizer):
    """transformers dequantizes the q4_0 file back: logits near the model's, farther than q8_0's."""
    from tunelab.export import load_run
    from tunelab.gguf_export import export_gguf

    src = _model_dir(tmp_path / "model", bpe_tokenizer, "qwen2")
    ours, tok, _ = load_run(src, device="cpu")
    ids = tok("Add the numbers. 12 + 7 please")["input_ids"]
    want = _logits(ours.eval(), ids)
    err = {q: (_logits(_load_gguf(export_gguf(src, tmp_path / f"{q}.gguf", q)), ids) - want).abs().max().item()
           for q in ("q8_0", "q4_0")}
    print(err)  # shown with -s
    assert err["q8_0"] < err["q4_0"] < 0.15


def _no_quantizer(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError


def test_k_quant_without_a_quantizer_is_one_line_and_no_file(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    _no_quantizer(monkeypatch, tmp_path)
    src = _model_dir(tmp_path / "m", bpe_tokenizer, "llama")
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    capsys.readouterr()
    for source in (src, tmp_path / "no-such-run"):  # checked before any loading
        assert main(["export", str(source), "--gguf", str(out), "--type", "q4_k_m"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: gguf export: q4_k_m needs llama.cpp's quantizer: install llama-cpp-python (pip install "
                       "llama-cpp-python) or put llama-quantize on PATH (or set LLAMA_QUANTIZE); f32, f16, bf16, "
                       "q8_0, q5_1, q5_0, q4_1, q4_0 work without it"]
    assert list(out.parent.iterdir()) == []
    assert main(["export", str(src), "--gguf", str(out), "--type", "q4_0"]) == 0  # native: no quantizer needed
    assert out.is_file()


FAKE = """#!/bin/sh
# a stand-in for llama.cpp's llama-quantize IN OUT TYPE: records its arguments, copies IN to OUT
PATH=/usr/bin:/bin
printf '%s\\n' "$@" > "{log}"
test -f "$1" || {{ echo "error: no input $1" >&2; exit 3; }}
{action}
"""


def _fake(folder, action='cp "$1" "$2"', name="llama-quantize"):
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(FAKE.format(log=folder / "argv.txt", action=action))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_k_quant_runs_llama_quantize_from_path(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    import gguf

    _no_quantizer(monkeypatch, tmp_path)
    fake = _fake(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    src = _model_dir(tmp_path / "m", bpe_tokenizer, "llama")
    out = tmp_path / "out" / "My Run.gguf"
    capsys.readouterr()
    assert main(["export", str(src), "--gguf", str(out), "--type", "q4_k_m"]) == 0
    argv = (fake.parent / "argv.txt").read_text().splitlines()
    assert argv == [str(out.parent / ".tmp-My Run.f16.gguf"), str(out.parent / ".tmp-My Run.gguf"), "Q4_K_M"]
    # the fake copied the f16 input: the final file is that f16 GGUF, whole; the temporaries are gone
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".tunelab")) == [
        "My Run.Modelfile", "My Run.gguf"]
    printed = capsys.readouterr().out
    assert "GGUF (q4_k_m) written to" in printed
    assert f"ollama create my-run -f '{out.parent / 'My Run.Modelfile'}'" in printed  # quoted for the shell
    # a second export replaces tunelab's own files without --overwrite
    assert main(["export", str(src), "--gguf", str(out), "--type", "q5_k_m"]) == 0
    assert (fake.parent / "argv.txt").read_text().splitlines()[-1] == "Q5_K_M"


def test_llama_quantize_from_env_and_its_failure(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    _no_quantizer(monkeypatch, tmp_path)
    src = _model_dir(tmp_path / "m", bpe_tokenizer, "llama")
    out = tmp_path / "out" / "m.gguf"
    failing = _fake(tmp_path / "env-bin", action='printf "partial" > "$2"; echo "llama_model_quantize: failed to '
                    'quantize: bad magic" >&2; exit 1', name="my-quantize")
    monkeypatch.setenv("LLAMA_QUANTIZE", str(failing))
    capsys.readouterr()
    assert main(["export", str(src), "--gguf", str(out), "--type", "q6_k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: gguf export: {failing} Q6_K failed (exit 1): llama_model_quantize: failed to quantize: "
                   "bad magic"]
    assert (failing.parent / "argv.txt").read_text().splitlines()[2] == "Q6_K"
    assert not out.parent.exists() or [p.name for p in out.parent.iterdir() if p.name != ".tunelab-written.json"] == []
    monkeypatch.setenv("LLAMA_QUANTIZE", str(tmp_path / "missing"))
    assert main(["export", str(src), "--gguf", str(out), "--type", "q6_k"]) == 2
    assert "LLAMA_QUANTIZE=" in capsys.readouterr().err and not out.exists()


def test_llama_cpp_python_quantizer_is_called(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    """Without llama-quantize, llama-cpp-python's llama_model_quantize(IN, OUT, params with the ftype)."""
    import ctypes
    import types

    import gguf

    calls = []

    class Params(ctypes.Structure):  # llama_model_quantize_params, cut down to the field tunelab sets
        _fields_ = [("ftype", ctypes.c_int)]

    def quantize(src, dst, params):
        calls.append((src, dst, params._obj.ftype))
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
        return 0

    fake = types.SimpleNamespace(llama_backend_init=lambda: None, llama_model_quantize_default_params=Params,
                                 llama_model_quantize=quantize)
    _no_quantizer(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    src = _model_dir(tmp_path / "m", bpe_tokenizer, "llama")
    out = tmp_path / "m.gguf"
    assert main(["export", str(src), "--gguf", str(out), "--type", "q4_k_s"]) == 0
    capsys.readouterr()
    (src_b, dst_b, ftype), = calls
    assert (src_b, dst_b) == (str(tmp_path / ".tmp-m.f16.gguf").encode(), str(tmp_path / ".tmp-m.gguf").encode())
    assert ftype == gguf.LlamaFileType.MOSTLY_Q4_K_S == 14
    assert out.is_file() and not list(tmp_path.glob(".tmp-*"))

    def failing(src, dst, params):  # llama.cpp logs through llama-cpp-python's callback, on sys.stderr
        print("[ 1/ 9] token_embd.weight ...\nllama_model_quantize: failed to quantize: boom", file=sys.stderr)
        open(dst, "wb").close()
        return 1

    fake.llama_model_quantize = failing
    out2 = tmp_path / "m2.gguf"
    assert main(["export", str(src), "--gguf", str(out2), "--type", "q4_k_s"]) == 2
    assert capsys.readouterr().err.strip() == ("error: gguf export: llama-cpp-python's llama_model_quantize Q4_K_S "
                                               "failed (code 1): llama_model_quantize: failed to quantize: boom")
    assert not out2.exists() and not list(tmp_path.glob(".tmp-*"))


def test_merged_dtype_bf16_equals_the_f32_merge_cast(tmp_path, bpe_tokenizer, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from tests.test_gguf_export import _train

    src = _model_dir(tmp_path / "base", bpe_tokenizer, "llama")
    run = _train(tmp_path, src, "lora")
    assert main(["export", str(run), "--merged", str(tmp_path / "f32")]) == 0
    assert main(["export", str(run), "--merged", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert "merged model (bf16) written to" in capsys.readouterr().out
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    f32 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32"), dtype=torch.float32).state_dict()
    bf16 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype="auto")
    assert bf16.dtype == torch.bfloat16
    got = bf16.state_dict()
    assert set(got) == set(f32)
    for name, w in f32.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], w.to(torch.bfloat16)), name
    base = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).state_dict()
    changed = [n for n in base if not torch.equal(base[n], f32[n])]
    assert changed  # the merge changed weights, so equality above is of the merged ones
    assert main(["export", str(run), "--merged", str(tmp_path / "x"), "--type", "q4_0"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: export: --type is for --gguf; the merged folder's dtype is --dtype"
    # a weight float16 cannot hold (the base's final norm, which LoRA leaves as it is): refused, no folder
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight[3] = 1e5
    model.save_pretrained(src)
    assert main(["export", str(run), "--merged", str(tmp_path / "f16"), "--dtype", "f16"]) == 2
    assert capsys.readouterr().err.strip() == ("error: export: --dtype f16: model.norm.weight has weights beyond "
                                               "float16's range (±65504); use --dtype bf16 or f32")
    assert not (tmp_path / "f16").exists() and not list(tmp_path.glob(".tmp-*"))


def test_dtype_belongs_to_merged(tmp_path, capsys):
    """--dtype with --gguf is refused before any work (the GGUF's type is --type)."""
    assert main(["export", str(tmp_path / "no-such-run"), "--gguf", str(tmp_path / "m.gguf"), "--dtype", "bf16"]) == 2
    assert capsys.readouterr().err.strip() == "error: export: --dtype is for --merged; a GGUF's tensor type is --type"
    assert list(tmp_path.iterdir()) == []

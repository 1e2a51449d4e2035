"""Export a run (adapter merged) or a model as one GGUF file for llama.cpp, Ollama, LM Studio…

    export_gguf("runs/demo", "demo.gguf", qtype="f16")   # tunelab export runs/demo --gguf demo.gguf --type f16

The source is a run directory (its adapter merged into the base: any mergeable method; `full`/`freeze` runs
saved the whole model), a merged HF folder, or any model reference tunelab loads. The file holds what llama.cpp
needs and nothing it would have to guess: the architecture's tensors under GGUF names (arch.py), its
hyper-parameters and rope settings, and the tokenizer with its special tokens and the run's chat template
(vocab.py: byte-level BPE as `gpt2`; spm.py: SentencePiece as `llama`, from the model's `tokenizer.model`,
which needs `pip install 'tunelab[sentencepiece]'`). Written with the `gguf` package's `GGUFWriter` (the writer
llama.cpp's own converter uses) to a temporary file renamed into place, so a failed export leaves nothing behind.

Tensor types (`qtype`): f32 | f16 | bf16 | q8_0 (`gguf.quants` does the conversion and the q8_0 blocks);
norms and biases stay f32 as in llama.cpp's converter. Tested: transformers loads the file back with logits
equal to the merged model's (f32 ≤ 1e-4; f16, bf16, q8_0 within the tolerances in tests/test_gguf_export.py),
and llama.cpp (llama-cpp-python) completes prompts greedily exactly as tunelab does (tests/test_gguf_llamacpp.py);
SentencePiece vocabularies: tests/test_gguf_spm.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import TunelabError
from ..userfiles import check_can_create, check_replaceable, note_written

QTYPES = ("f32", "f16", "bf16", "q8_0")


def _types(qtype: str):
    """(GGMLQuantizationType for matrices, LlamaFileType) of a --type name."""
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16), "bf16": (q.BF16, f.MOSTLY_BF16),
            "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}[qtype]


def encode_tensor(name: str, data, qtype: str):
    """(bytes-or-floats ndarray, GGMLQuantizationType) of one float32 numpy tensor, by llama.cpp's rules:
    1-D tensors and norms stay F32; a q8_0 tensor whose rows are not a multiple of 32 falls back to F16."""
    import gguf

    target = _types(qtype)[0]
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        target = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, target), target
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def write_gguf(model, tok, chat_template: str | None, out: Path, qtype: str = "f16", name: str | None = None) -> dict:
    """Write a plain (merged) HF causal LM and its tokenizer as a GGUF file at `out` (atomically)."""
    import gguf

    from .arch import add_hparams, gguf_arch, gguf_tensors
    from .vocab import add_tokenizer

    if qtype not in QTYPES:
        raise TunelabError(f"gguf export: --type {qtype!r} is unknown; choose from {', '.join(QTYPES)}")
    arch, _ = gguf_arch(model.config)  # refuse an unsupported architecture before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or out.stem)
        add_hparams(writer, model.config)
        writer.add_file_type(_types(qtype)[1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        special = add_tokenizer(writer, tok, chat_template, model.config, int(model.config.vocab_size))
        for tname, t in gguf_tensors(model):
            data, dtype = encode_tensor(tname, t.numpy(), qtype)
            writer.add_tensor(tname, data, raw_dtype=dtype)  # the writer turns byte shapes into element shapes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException as e:
        writer.close()
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):  # a full disk, a read-only or vanished folder: one line, nothing left behind
            from ..train.guards import disk_full, is_disk_full

            if is_disk_full(e):
                raise disk_full("the GGUF file", out.parent) from None
            raise TunelabError(f"gguf export: cannot write {out} ({e.strerror or e})") from None
        raise
    note_written(out)  # tunelab's own file: a later export may replace it without --overwrite
    return special


def export_gguf(source: str | Path, out: str | Path, qtype: str = "f16", overwrite: bool = False) -> Path:
    """Merge a run's adapter (or take a merged folder / model reference) and write it as a GGUF file."""
    from ..adapters.base import merge
    from ..export import load_run
    from .arch import gguf_arch

    out = Path(out)
    if qtype not in QTYPES:
        raise TunelabError(f"gguf export: --type {qtype!r} is unknown; choose from {', '.join(QTYPES)}")
    if out.suffix != ".gguf":
        raise TunelabError(f"gguf export: the output {out} should end in .gguf")
    if out.is_dir():
        raise TunelabError(f"gguf export: {out} is a folder")
    # the output path first, before minutes of loading and merging: a file tunelab did not write (without
    # --overwrite), a folder nothing can be written in (/proc, a read-only mount)
    check_replaceable(out, "gguf export:", overwrite)
    check_can_create(out, "gguf export:")
    model, tok, template = load_run(source, device="cpu", dtype="float32")
    try:
        merge(model)  # a no-op for a plain model; "not mergeable" (LoReFT) is a one-line TunelabError
    except TunelabError as e:
        raise TunelabError(f"gguf export: {e}") from None
    gguf_arch(model.config)
    write_gguf(model, tok, template.jinja, out, qtype, name=Path(str(source)).name)
    return out

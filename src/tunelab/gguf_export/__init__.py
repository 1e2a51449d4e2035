"""Export a run (adapter merged) or a model as one GGUF file for llama.cpp, Ollama, LM Studio…

    export_gguf("runs/demo", "demo.gguf", qtype="f16")   # tunelab export runs/demo --gguf demo.gguf --type f16
    # also writes demo.Modelfile:  ollama create demo -f demo.Modelfile

The source is a run directory (its adapter merged into the base: any mergeable method; `full`/`freeze` runs
saved the whole model), a merged HF folder, or any model reference tunelab loads. The file holds what llama.cpp
needs and nothing it would have to guess: the architecture's tensors under GGUF names (arch.py), its
hyper-parameters and rope settings, and the tokenizer with its special tokens and the run's chat template
(vocab.py: byte-level BPE as `gpt2`; spm.py: SentencePiece as `llama`, from the model's `tokenizer.model`,
which needs `pip install 'tunelab[sentencepiece]'`). Written with the `gguf` package's `GGUFWriter` (the writer
llama.cpp's own converter uses) to a temporary file renamed into place, so a failed export leaves nothing behind.

Tensor types (`qtype`, quantize.py): f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0 written here
(`gguf.quants` does the conversion and the blocks; norms and biases stay f32, the output matrix of the 4/5-bit
types q8_0, as llama.cpp does), and the k-quants q6_k … q2_k (q4_k_m, q5_k_m…) by llama.cpp's quantizer from an
f16 file — `llama-quantize` or llama-cpp-python, one line saying how to get one when neither is installed.
Beside the GGUF: an Ollama Modelfile with the run's chat template as Ollama's Go template (modelfile.py).

Tested: transformers loads the file back with logits equal to the merged model's (f32 ≤ 1e-4; f16, bf16, q8_0
within the tolerances in tests/test_gguf_export.py; q4_0…q5_1 dequantized within their block error in
tests/test_gguf_quant.py), and llama.cpp (llama-cpp-python) completes prompts greedily exactly as tunelab does
and runs its own q4_k_m quantization of the export (tests/test_gguf_llamacpp.py); SentencePiece vocabularies:
tests/test_gguf_spm.py; the Modelfile: tests/test_gguf_modelfile.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import TunelabError
from ..userfiles import check_can_create, check_replaceable, note_written, write_file
from .modelfile import modelfile_path, modelfile_text, ollama_name
from .quantize import (LLAMACPP, NATIVE, QTYPES, check_qtype, encode_tensor, file_type, find_quantizer,
                       run_quantizer)

__all__ = ["QTYPES", "NATIVE", "LLAMACPP", "encode_tensor", "write_gguf", "export_gguf", "modelfile_path",
           "ollama_name"]


def write_gguf(model, tok, chat_template: str | None, out: Path, qtype: str = "f16", name: str | None = None,
               record: bool = True) -> dict:
    """Write a plain (merged) HF causal LM and its tokenizer as a GGUF file at `out` (atomically) with tunelab's
    own quantizers (`NATIVE` types); `record`: note it in the folder's ledger as tunelab's file."""
    import gguf

    from .arch import add_hparams, gguf_arch, gguf_tensors
    from .vocab import add_tokenizer

    if qtype not in NATIVE:
        raise TunelabError(f"gguf export: write_gguf writes {', '.join(NATIVE)}; {qtype} is llama.cpp's to make")
    arch, _ = gguf_arch(model.config)  # refuse an unsupported architecture before any work
    tied = bool(getattr(model.config, "tie_word_embeddings", False))  # token_embd.weight is the output matrix too
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or out.stem)
        add_hparams(writer, model.config)
        writer.add_file_type(file_type(qtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        special = add_tokenizer(writer, tok, chat_template, model.config, int(model.config.vocab_size))
        for tname, t in gguf_tensors(model):
            data, dtype = encode_tensor(tname, t.numpy(), qtype, tied)
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
    if record:
        note_written(out)  # tunelab's own file: a later export may replace it without --overwrite
    return special


def export_gguf(source: str | Path, out: str | Path, qtype: str = "f16", overwrite: bool = False,
                modelfile: bool = True) -> Path:
    """Merge a run's adapter (or take a merged folder / model reference) and write it as a GGUF file, with an
    Ollama Modelfile beside it (`modelfile_path(out)`). llama.cpp types (`LLAMACPP`): an f16 GGUF written to a
    temporary name, quantized by llama.cpp's quantizer into another, renamed into place; both temporaries removed
    whatever happens."""
    from ..adapters.base import merge
    from ..export import load_run
    from .arch import gguf_arch

    out = Path(out)
    check_qtype(qtype)
    if out.suffix != ".gguf":
        raise TunelabError(f"gguf export: the output {out} should end in .gguf")
    if out.is_dir():
        raise TunelabError(f"gguf export: {out} is a folder")
    # before minutes of loading and merging: the quantizer a llama.cpp type needs, and the output paths — a
    # file tunelab did not write (without --overwrite), a folder nothing can be written in (/proc, read-only)
    quantizer = find_quantizer(qtype) if qtype in LLAMACPP else None
    check_replaceable(out, "gguf export:", overwrite)
    if modelfile:
        check_replaceable(modelfile_path(out), "gguf export:", overwrite)
    check_can_create(out, "gguf export:")
    model, tok, template = load_run(source, device="cpu", dtype="float32")
    try:
        merge(model)  # a no-op for a plain model; "not mergeable" (LoReFT) is a one-line TunelabError
    except TunelabError as e:
        raise TunelabError(f"gguf export: {e}") from None
    gguf_arch(model.config)
    name = Path(str(source)).name
    if quantizer is None:
        special = write_gguf(model, tok, template.jinja, out, qtype, name=name)
    else:
        special = _quantized(model, tok, template.jinja, out, qtype, name, quantizer)
    if modelfile:  # a BOS the template writes is llama.cpp's to add when the file says add_bos_token
        bos = (getattr(tok, "bos_token", None) or "") if special["add"].get("bos") else ""
        text = modelfile_text(out, template, bos=bos, eos=getattr(tok, "eos_token", None) or "")
        write_file(modelfile_path(out), text, "gguf export:", overwrite=True)  # checked above
    return out


def _quantized(model, tok, jinja, out: Path, qtype: str, name: str, quantizer) -> dict:
    """f16 GGUF → llama.cpp's quantizer → `out`, through temporary names in `out`'s folder."""
    f16 = out.with_name(f".tmp-{out.stem}.f16.gguf")
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        special = write_gguf(model, tok, jinja, f16, "f16", name=name, record=False)
        tmp.unlink(missing_ok=True)
        run_quantizer(quantizer, f16, tmp, qtype)
        os.replace(tmp, out)
    except OSError as e:
        raise TunelabError(f"gguf export: cannot write {out} ({e.strerror or e})") from None
    finally:
        for path in (f16, tmp):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
    note_written(out)
    return special

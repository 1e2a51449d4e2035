"""llama.cpp itself runs tunelab's GGUF export: a LoRA-trained SmolLM2-135M run, merged and exported as f32 and
f16 GGUF, completes prompts greedily exactly as tunelab's own sampler does on the merged model, token for token,
and llama.cpp tokenizes the chat-rendered prompts to the same ids as the HF tokenizer; on tiny llama / qwen2 /
mistral models llama.cpp's logits equal the HF model's; a tiny Llama with a Llama-2-style SentencePiece tokenizer
tokenizes as SentencePiece does and completes greedily as transformers does; `--type q4_k_m` is quantized by
llama-cpp-python's llama_model_quantize and the Q4_K_M file chats in llama.cpp.

Needs llama-cpp-python (`make test-llamacpp` builds and installs it, then runs this file); skipped without it.
"""

import os
import shutil

import pytest

from tests.helpers import alpaca_rows, write_config, write_jsonl
from tests.test_gguf_export import _model_dir, bpe_tokenizer  # noqa: F401  (the tiny BPE tokenizer fixture)
from tests.test_gguf_spm import LEADING, TEXTS, spm_model_dir  # noqa: F401  (the tiny SentencePiece Llama)
from tunelab.cli import main

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

PROMPTS = ["Add the numbers. 2 + 3", "What is the capital of France?", "Write a haiku about the sea.",
           "Add the numbers. 40 + 17 please"]
N = 24  # new tokens per prompt


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llamacpp")
    data = write_jsonl(tmp / "d.jsonl", alpaca_rows(12))
    cfg = write_config(tmp / "c.yaml", output_dir=str(tmp / "run"), method="lora", model={"name": "smollm2-135m"},
                       data={"train": str(data), "max_length": 96, "eval_max": 2, "eval_fraction": 0.2},
                       lora={"r": 4, "alpha": 8, "target_modules": "all-linear"},
                       train={"max_steps": 3, "batch_size": 2, "lr": 5e-3}, samples={"n_heldout": 0})
    assert main(["train", str(cfg)]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def tunelab_greedy(lora_run):
    """Prompt ids and tunelab's greedy completion ids (merged model, sampling.sample), stop token removed."""
    from tunelab.adapters.base import merge
    from tunelab.export import load_run
    from tunelab.sampling import sample

    model, tok, template = load_run(lora_run, device="cpu")
    merge(model)
    out = []
    for p in PROMPTS:
        ids = tok(template.generation_prompt([{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
        done = sample(model, tok, [ids], temperature=0.0, max_new_tokens=N).completions()[0]
        out.append((ids, [t for t in done if t != tok.eos_token_id]))
    return out, template


def _llama_greedy(llm, ids):
    got = []
    llm.reset()
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if llm.token_eos() == t or len(got) == N:
            break
        got.append(t)
    return got


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_llama_cpp_greedy_equals_tunelab(lora_run, tunelab_greedy, tmp_path, qtype, capsys):
    expected, template = tunelab_greedy
    out = tmp_path / f"run-{qtype}.gguf"
    assert main(["export", str(lora_run), "--gguf", str(out), "--type", qtype]) == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, n_threads=2, n_batch=512, verbose=False, seed=0)
    assert llm.metadata["tokenizer.chat_template"] == template.jinja
    report = []
    for prompt, (ids, want) in zip(PROMPTS, expected):
        rendered = template.generation_prompt([{"role": "user", "content": prompt}])
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids  # same tokenizer
        got = _llama_greedy(llm, ids)
        report.append(f"{qtype} {prompt!r}: llama.cpp {llm.detokenize(got).decode(errors='replace')!r}")
        assert got == want, (prompt, got, want)
    with capsys.disabled():
        print("\n" + "\n".join(report))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_llama_cpp_logits_on_tiny_models(tmp_path, bpe_tokenizer, arch):
    """llama.cpp's own llama / qwen2 graphs (interleaved vs NEOX rope, q/k/v biases) on our f32 export give the
    HF model's logits at every prompt position, and tokenize like the HF tokenizer (gpt-2 pre-tokenizer,
    [PAD] rows past the tokenizer's vocabulary)."""
    import numpy as np
    import torch

    from tunelab.export import load_run
    from tunelab.gguf_export import export_gguf

    src = _model_dir(tmp_path / "model", bpe_tokenizer, arch)
    out = export_gguf(src, tmp_path / "m.gguf", "f32")
    model, tok, _ = load_run(src, device="cpu")
    text = "Add the numbers. 12 + 7 please, then 3 + 4."
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        want = model.eval()(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    print(arch, f"llama.cpp vs HF max |Δlogit| {np.abs(got - want).max():.1e}")  # shown with -s
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()


def test_llama_cpp_logits_on_a_tiny_qwen3(tmp_path, bpe_tokenizer):
    """qwen3: per-head q/k RMS norms and a head size ≠ hidden/heads (written as key/value_length). Checked with
    llama.cpp only: transformers 5.24's GGUF loader ignores the key length of a qwen3 file (it keeps its
    default head_dim 128), so a transformers round trip works only for models with that head size."""
    import numpy as np
    import torch
    import transformers as tf

    from tunelab.gguf_export import export_gguf

    torch.manual_seed(0)
    cfg = tf.Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1, 0.3)  # not all ones: the q/k norms must land on the right tensors
    model.save_pretrained(tmp_path / "q3")
    bpe_tokenizer.save_pretrained(tmp_path / "q3")
    out = export_gguf(tmp_path / "q3", tmp_path / "q3.gguf", "f32")
    ids = bpe_tokenizer("Add the numbers. 12 + 7 please")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    err = np.abs(np.array(llm.scores[:len(ids)]) - want).max()
    print(f"qwen3 llama.cpp vs HF max |Δlogit| {err:.1e}")
    assert err < 1e-3


def test_llama_cpp_runs_a_sentencepiece_export(tmp_path, spm_model_dir):
    """A Llama-2-style SentencePiece vocabulary (`tokenizer.ggml.model = llama`: pieces, scores, byte tokens):
    llama.cpp's own SPM tokenizer on the f32 export tokenizes the texts to the HF tokenizer's ids (byte fallback
    included) and every text, leading spaces too, exactly as SentencePiece itself; its logits equal the HF
    model's and its greedy completion equals transformers' greedy `generate` on the HF model, token for token."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.gguf_export import export_gguf

    src, sp = spm_model_dir
    out = export_gguf(src, tmp_path / "spm.gguf", "f32")
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
    for text in TEXTS + LEADING:  # the HF tokenizer differs from SentencePiece on LEADING (test_gguf_spm.py)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [sp.bos_id(), *sp.encode(text)], text
    report, worst = [], 0.0
    for text in TEXTS[:3]:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=N)[0, len(ids):].tolist()
        hf = hf[:hf.index(tok.eos_token_id)] if tok.eos_token_id in hf else hf
        llm.reset()
        llm.eval(ids)
        worst = max(worst, float(np.abs(np.array(llm.scores[:len(ids)]) - want).max()))
        got = _llama_greedy(llm, ids)
        assert got == hf, (text, got, hf)
        completion = llm.detokenize(got).decode(errors="replace")
        report.append(f"spm {text!r}: {len(got)} greedy ids equal; llama.cpp {completion!r}")
    print("\n".join(report) + f"\nspm llama.cpp vs HF max |Δlogit| {worst:.1e}")  # shown with -s
    assert worst < 1e-3


def _plain_kernels(monkeypatch):
    """llama.cpp's repacked CPU kernels for k-quant weights ("extra buffer types": AMX, when built with
    -march=native on a CPU that has it) segfault in decode on some machines; they are llama.cpp's, not the file's
    concern, so quantized files are run on llama.cpp's plain kernels."""
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def plain():
        params = default_params()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain)


def test_llama_cpp_quantizes_q4_k_m_and_runs_it(lora_run, tunelab_greedy, tmp_path, monkeypatch, capsys):
    """`--type q4_k_m` without llama-quantize on PATH: llama-cpp-python's llama_model_quantize turns tunelab's f16
    GGUF into llama.cpp's Q4_K_M mix (k-quant blocks of 256 where the rows allow — SmolLM2's 1536-wide
    ffn_down; its 576-wide rows take llama.cpp's fallbacks q5_0/q8_0), and llama.cpp loads and chats with it."""
    import gguf

    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    expected, template = tunelab_greedy
    out = tmp_path / "run-q4_k_m.gguf"
    assert main(["export", str(lora_run), "--gguf", str(out), "--type", "q4_k_m"]) == 0
    assert not list(tmp_path.glob(".tmp-*")) and (tmp_path / "run-q4_k_m.Modelfile").is_file()
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] in ("Q4_K", "Q6_K") and types["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["tokenizer.chat_template"].contents() == template.jinja
    f16 = tmp_path / "run-f16.gguf"
    assert main(["export", str(lora_run), "--gguf", str(f16), "--type", "f16"]) == 0
    assert out.stat().st_size < 0.6 * f16.stat().st_size
    _plain_kernels(monkeypatch)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, n_threads=2, n_batch=512, verbose=False, seed=0)
    report = []
    for prompt, (ids, want) in zip(PROMPTS, expected):
        got = _llama_greedy(llm, ids)
        text = llm.detokenize(got).decode(errors="replace")
        report.append(f"q4_k_m {prompt!r}: llama.cpp {text!r} (f32 tunelab: {len(want)} tokens)")
        assert got and text.strip(), prompt  # it generates text
    with capsys.disabled():
        print("\n" + "\n".join(report) + "\n" + str(sorted(set(types.values()))))


@pytest.mark.skipif(not (os.environ.get("LLAMA_QUANTIZE") or shutil.which("llama-quantize")),
                    reason="no llama-quantize program (PATH or LLAMA_QUANTIZE)")
def test_llama_quantize_program_makes_q5_k_m(lora_run, tmp_path, monkeypatch, capsys):
    """The `llama-quantize IN OUT Q5_K_M` route: llama.cpp's own program quantizes, llama.cpp runs the file."""
    import gguf

    out = tmp_path / "run-q5_k_m.gguf"
    assert main(["export", str(lora_run), "--gguf", str(out), "--type", "q5_k_m"]) == 0
    assert not list(tmp_path.glob(".tmp-*"))
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q5_K_M
    types = {t.tensor_type.name for t in reader.tensors}
    assert {"Q5_K", "Q6_K"} & types, types
    _plain_kernels(monkeypatch)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False, seed=0)
    rendered = "<|im_start|>user\nAdd the numbers. 2 + 3<|im_end|>\n<|im_start|>assistant\n"
    got = _llama_greedy(llm, llm.tokenize(rendered.encode(), add_bos=False, special=True))
    text = llm.detokenize(got).decode(errors="replace")
    with capsys.disabled():
        print(f"\nllama-quantize q5_k_m {sorted(types)}: llama.cpp {text!r}")
    assert text.strip()

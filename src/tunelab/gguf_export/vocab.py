"""The tokenizer part of a GGUF file: vocabulary, merges or scores, special tokens, add-bos/eos flags, chat template.

llama.cpp re-implements tokenizers natively, so a GGUF carries the tokenizer as metadata. For a byte-level BPE
tokenizer (GPT-2 style: SmolLM2, Llama 3, Qwen2…) that is, as llama.cpp's `convert_hf_to_gguf.py` writes it:

* `tokenizer.ggml.model = "gpt2"` and the token strings in id order (ids with no token: `[PAD{i}]`, UNUSED);
* a token type per id: CONTROL for special added tokens (`<|im_start|>`), USER_DEFINED for other added tokens,
  NORMAL for the rest;
* `tokenizer.ggml.pre`: the *pre-tokenizer* (the regex split before BPE). llama.cpp names it by hashing the
  ids of a fixed check text (`CHECK_TEXT` below, copied from the converter) and looking the hash up in a
  table; we do the same for the families tunelab exports. An unknown hash is refused: a wrong pre-tokenizer
  silently tokenizes differently from the model's training;
* merges, special token ids and the chat template, read by the `gguf` package's own `SpecialVocab` from the
  saved tokenizer folder (the exact code llama.cpp's converter runs);
* `add_bos_token` / `add_eos_token` measured on the tokenizer itself (does encoding "a" add them?), because
  llama.cpp's default when the key is absent differs per tokenizer type.

SentencePiece tokenizers (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral 7B v0.1–v0.3, TinyLlama) take the
same special-token, flag and chat-template path; their tokens, scores and types come from the model's own
`tokenizer.model` (spm.py), `tokenizer.ggml.pre` is "default", and `add_space_prefix` is measured on the tokenizer
(does it prepend "▁"?). A tokenizer that is neither is refused with one line.
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from pathlib import Path

from ..errors import TunelabError

# llama.cpp's convert_hf_to_gguf.py `get_vocab_base_pre` check text: its ids' hash identifies a pre-tokenizer.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')

# sha256(str(ids of CHECK_TEXT)) -> llama.cpp pre-tokenizer name (values from llama.cpp's converter table).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Llama 3, 3.1, 3.2
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",   # Llama-3 finetunes
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",       # Qwen1.5, Qwen2, 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",       # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",      # Mistral Nemo / tekken
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


# When the hash is unknown (a vocabulary llama.cpp's table has never seen, e.g. a retrained tokenizer), the
# pre-tokenizer is recognised by its split regex instead: llama.cpp implements these exact regexes natively.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
REGEXES = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}


def _by_structure(tok) -> str | None:
    """llama.cpp's pre-tokenizer name from the tokenizer's pre-tokenizer spec: GPT-2's ByteLevel regex alone,
    or a Split with Qwen2's / Llama 3's regex followed by a regex-free ByteLevel."""
    pre = json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel" \
            and not parts[1].get("use_regex", True):
        return REGEXES.get(parts[0].get("pattern", {}).get("Regex"))
    return None


def pre_tokenizer(tok) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: by llama.cpp's check hash, else by its regex."""
    digest = sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest) or _by_structure(tok)
    if name is None:
        raise TunelabError(f"gguf export: unknown BPE pre-tokenizer (llama.cpp check hash {digest[:16]}…); "
                           f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}")
    return name


def _is_byte_level_bpe(tok) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    return spec.get("model", {}).get("type") == "BPE" and '"ByteLevel"' in pre


def tokens_and_types(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings in id order and their GGUF token types (llama.cpp's `get_vocab_base` rules)."""
    import gguf

    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise TunelabError(f"gguf export: the tokenizer has ids ≥ the model's vocab_size {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:  # embedding rows past the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp assumes added tokens are pre-normalised
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            looks_special = token.startswith(("<|", "<｜")) and token.endswith(("|>", "｜>"))
            types.append(gguf.TokenType.CONTROL if decoder[i].special or looks_special
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def add_tokenizer(writer, tok, chat_template: str | None, model_config, vocab_size: int) -> dict:
    """Write the tokenizer metadata; returns what was written about special tokens (for messages/tests)."""
    import gguf

    from .spm import adds_space_prefix, is_sentencepiece, sentencepiece_vocab

    if _is_byte_level_bpe(tok):
        kind = "gpt2"
        tokens, types = tokens_and_types(tok, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tok))
    elif is_sentencepiece(tok):
        kind = "llama"
        tokens, scores, types = sentencepiece_vocab(tok, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
    else:
        raise TunelabError(f"gguf export: the tokenizer ({type(tok).__name__}) is neither byte-level BPE nor "
                           "SentencePiece; GGUF export supports byte-level BPE (SmolLM2, Llama 3, Qwen2/3, Mistral "
                           "Nemo) and SentencePiece tokenizers (Llama 2, Mistral 7B)")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        # SpecialVocab reads a saved tokenizer folder (+ config.json), exactly as llama.cpp's converter does
        old = tok.chat_template
        tok.chat_template = chat_template
        try:
            tok.save_pretrained(tmp)
        finally:
            tok.chat_template = old
        model_config.to_json_file(str(Path(tmp) / "config.json"))
        special = gguf.SpecialVocab(tmp, load_merges=kind == "gpt2", n_vocab=vocab_size)
    if kind == "gpt2" and not special.merges:
        raise TunelabError("gguf export: the tokenizer has no BPE merges")
    probe = tok("a")["input_ids"]  # what the tokenizer itself adds around a text
    special.add_special_token["bos"] = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
    special.add_special_token["eos"] = tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id]
    if tok.pad_token_id is not None:  # tunelab sets pad = eos when a tokenizer has none
        special.special_token_ids.setdefault("pad", int(tok.pad_token_id))
    special.add_to_gguf(writer, quiet=True)
    if kind == "llama":
        writer.add_add_space_prefix(adds_space_prefix(tok))
    elif getattr(tok, "add_prefix_space", None) is not None:
        writer.add_add_space_prefix(bool(tok.add_prefix_space))
    return {"ids": dict(special.special_token_ids), "add": dict(special.add_special_token),
            "merges": len(special.merges), "tokens": len(tokens), "model": kind}

"""SentencePiece vocabularies for GGUF (`tokenizer.ggml.model = "llama"`): Llama 2, Mistral 7B v0.1–v0.3, TinyLlama…

llama.cpp re-implements SentencePiece natively (its "SPM" tokenizer): spaces become "▁" (one is prepended when
`add_space_prefix`), the text is split into characters, and the adjacent pair whose joined piece has the highest
*score* is merged until none is left; characters the vocabulary lacks become `<0xXX>` byte tokens. So the GGUF
needs the SentencePiece model's own piece scores (for a BPE model: minus the merge rank) — a tokenizer.json holds
merges, not scores, and giving every token the same score would merge in the wrong order — and therefore the
`tokenizer.model` file itself, read with the `sentencepiece` package (`pip install 'tunelab[sentencepiece]'`).
Written as llama.cpp's `convert_hf_to_gguf.py` (`_create_vocab_sentencepiece`) writes it:

* tokens = the model's pieces in id order, scores = their scores, types = their piece types (NORMAL, UNKNOWN,
  CONTROL, USER_DEFINED, UNUSED, BYTE: protobuf's numbers are GGUF's `TokenType` numbers);
* tokens added on top of the model (the tokenizer's `added_tokens_decoder`: tokenizer.json, added_tokens.json,
  tokenizer_config.json): CONTROL when special or looking special (`<|…|>`), USER_DEFINED otherwise, with "▁"
  written as a space (llama.cpp matches user-defined tokens in the raw text), score -1000; an added token that
  is the model's own UNKNOWN / CONTROL / BYTE piece (`<unk>`, `<s>`, `</s>`) keeps the model's type and score;
* embedding rows past the vocabulary: `[PAD{i}]`, UNUSED, score -10000.

The piece types are read from the model's protobuf bytes by `piece_types` (a few lines of wire format): the
sentencepiece processor answers IsControl / IsUnknown / IsUnused / IsByte but has no user-defined test, and its
generated protobuf module would need the protobuf package. Before anything is written the model file is checked
against the tokenizer the model was trained with: every piece must be that tokenizer's token of the same id.

llama.cpp's score-ordered merging is SentencePiece's BPE algorithm, so a BPE model (all the families above)
tokenizes exactly as SentencePiece does; a unigram model is written the same way (as llama.cpp's converter
does) but llama.cpp only approximates its Viterbi segmentation.
"""

from __future__ import annotations

import json

from ..errors import TunelabError
from ..models.load import sentencepiece_file

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece ModelProto / gguf.TokenType


def is_sentencepiece(tok) -> bool:
    """Does this tokenizer come from a SentencePiece model? A `tokenizer.model` beside it, a Llama tokenizer class,
    or a tokenizer.json that is Unigram, BPE with byte fallback, or "▁"-escaping (Metaspace). Byte-level BPE
    tokenizers (SmolLM2, Llama 3, Qwen) are told apart before this is asked."""
    if sentencepiece_file(tok) is not None or "LlamaTokenizer" in type(tok).__name__:
        return True
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    escapes = "▁" in json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return model.get("type") == "Unigram" or bool(model.get("byte_fallback")) or escapes


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for everything else."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise TunelabError(f"gguf export: tokenizer.model is not a SentencePiece model (protobuf wire type {wire})")
        yield key >> 3, value


def piece_types(model_proto: bytes) -> list[int]:
    """The type of every piece of a serialized SentencePiece `ModelProto` (field 1: repeated SentencePiece
    {1: piece, 2: score, 3: type, absent = NORMAL})."""
    types = []
    for field, value in _fields(model_proto):
        if field == 1:
            types.append(next((v for f, v in _fields(value) if f == 3), NORMAL))
    return types


def _load(tok):
    """The tokenizer's SentencePiece model, loaded; one line naming what is missing otherwise."""
    path = sentencepiece_file(tok)
    if path is None:
        where = getattr(tok, "name_or_path", "") or "the tokenizer's folder"
        raise TunelabError(f"gguf export: {type(tok).__name__} is a SentencePiece tokenizer but its tokenizer.model "
                           f"is missing (not in {where}); copy the base model's tokenizer.model there")
    try:
        import sentencepiece
    except ImportError:
        raise TunelabError("gguf export: SentencePiece tokenizers need the sentencepiece package: "
                           "pip install 'tunelab[sentencepiece]'") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TunelabError(f"gguf export: {path} is not a SentencePiece model ({first})") from None
    return sp, path


def sentencepiece_vocab(tok, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) for `vocab_size` ids, from the tokenizer's `tokenizer.model` and its
    added tokens (llama.cpp's `_create_vocab_sentencepiece` rules, module docstring)."""
    sp, path = _load(tok)
    n = sp.vocab_size()
    added = tok.added_tokens_decoder
    vocab = tok.get_vocab()
    top = max([n - 1, *vocab.values()])
    if top >= vocab_size:
        raise TunelabError(f"gguf export: the tokenizer has ids ≥ the model's vocab_size {vocab_size}")
    tokens = [sp.IdToPiece(i) for i in range(n)]
    reverse = {i: t for t, i in vocab.items()}
    wrong = next((i for i in sorted(reverse) if i not in added and (i >= n or reverse[i] != tokens[i])), None)
    if wrong is not None:
        theirs = repr(tokens[wrong]) if wrong < n else "nothing"
        raise TunelabError(f"gguf export: {path} does not belong to this tokenizer: id {wrong} is {theirs} there "
                           f"but {reverse[wrong]!r} in the tokenizer")
    scores = [sp.GetScore(i) for i in range(n)]
    types = piece_types(sp.serialized_model_proto())
    if len(types) != n:
        raise TunelabError(f"gguf export: {path}: {len(types)} piece types for {n} pieces")
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    scores += [-10000.0] * (vocab_size - n)
    types += [UNUSED] * (vocab_size - n)
    for i, t in sorted(added.items()):
        own = i < n and tokens[i] == t.content
        if own and types[i] in (UNKNOWN, CONTROL, BYTE):
            continue  # <unk>, <s>, </s>: the model already says what they are
        looks_special = t.content.startswith(("<|", "<｜")) and t.content.endswith(("|>", "｜>"))
        types[i] = CONTROL if t.special or looks_special else USER_DEFINED
        tokens[i] = t.content if types[i] == CONTROL else t.content.replace("▁", " ")
        if not own:
            scores[i] = -1000.0
    for i in range(n):
        if types[i] == USER_DEFINED:
            tokens[i] = tokens[i].replace("▁", " ")
    return tokens, scores, types


def adds_space_prefix(tok) -> bool:
    """Does the tokenizer prepend "▁" to a text (SentencePiece's add_dummy_prefix)? Measured on the tokenizer the
    model was trained with: llama.cpp's `add_space_prefix`, true by default for SPM vocabularies."""
    ids = tok.encode("a", add_special_tokens=False)
    return bool(ids) and str(tok.convert_ids_to_tokens(ids[0])).startswith("▁")

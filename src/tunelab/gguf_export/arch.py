"""What GGUF calls each architecture's hyper-parameters and tensors — the part no library hands us.

Tensor names come from the `gguf` package's own tables (`gguf.get_tensor_name_map`: `model.layers.3.self_attn.q_proj`
→ `blk.3.attn_q`), the ones llama.cpp's converter uses. What is ours is the short list below and two conventions
of llama.cpp's `convert_hf_to_gguf.py`, reproduced and tested against it:

* **Q/K permutation (llama-style RoPE).** Hugging Face's Llama checkpoints store the rows of `q_proj`/`k_proj`
  of each head in "rotate-half" order (first all real parts, then all imaginary parts), because HF's
  `rotate_half` pairs dimension i with i + d/2. llama.cpp's LLAMA rope pairs adjacent dimensions (2i, 2i+1),
  so the converter interleaves the two halves of every head back: rows reshaped [heads, 2, d/2, in] →
  swap axes 1, 2 → [heads·d, in] (`LlamaModel.permute`; n_kv_heads for k). Qwen2/Qwen3 use llama.cpp's NEOX
  rope (the HF pairing), so their weights are written as stored.
* **Which tensors stay float32**: 1-D tensors (norms, biases) and `*_norm.weight` always; the others follow
  the file type (quantize.py: a row not a whole number of blocks falls back to f16, as llama.cpp does).

Supported: llama (SmolLM/SmolLM2 and Llama 3.x with byte-level BPE, llama3 rope scaling included; Llama 2 and
TinyLlama with their SentencePiece tokenizer), mistral (7B v0.1–v0.3 with SentencePiece, Nemo with tekken BPE;
written as `llama`, as llama.cpp does; a sliding window is not represented, as in llama.cpp), qwen2, qwen3.
The tokenizer is vocab.py's (byte-level BPE) and spm.py's (SentencePiece). Others (gemma's +1 norms, phi3's
fused qkv, MoE experts…) are refused with one line.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ..errors import TunelabError

# HF model_type -> (gguf MODEL_ARCH member name, undo HF's rotate-half q/k layout?)
ARCHS = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
}


def gguf_arch(config):
    """(gguf.MODEL_ARCH, permute q/k?) for a transformers config, or a one-line error."""
    import gguf

    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise TunelabError(f"gguf export: architecture '{kind}' is not supported; supported: {', '.join(ARCHS)}")
    name, permute = ARCHS[kind]
    return getattr(gguf.MODEL_ARCH, name), permute


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order → llama.cpp's interleaved order, per head (llama.cpp's `LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _rope(c) -> dict:
    """transformers ≥ 5 keeps rope settings in `rope_parameters`; older configs in rope_theta/rope_scaling."""
    params = dict(getattr(c, "rope_parameters", None) or {})
    params.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    scaling = getattr(c, "rope_scaling", None) or {}
    for k, v in scaling.items():
        params.setdefault("rope_type" if k == "type" else k, v)
    return params


def add_hparams(writer, config) -> None:
    """Architecture metadata: sizes, heads, context length, rope settings, norm epsilon."""
    import gguf

    c = config
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_block_count(int(c.num_hidden_layers))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_head_count(int(c.num_attention_heads))
    writer.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(int(c.vocab_size))
    if _head_dim(c) != c.hidden_size // c.num_attention_heads:
        writer.add_key_length(_head_dim(c))
        writer.add_value_length(_head_dim(c))
    rope = _rope(c)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if ARCHS[c.model_type][0] == "LLAMA":
        writer.add_rope_dimension_count(_head_dim(c))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3: the rope_freqs tensor below
        raise TunelabError(f"gguf export: rope scaling '{kind}' is not supported (default, linear, yarn, llama3)")


def llama3_rope_factors(c) -> torch.Tensor:
    """Llama 3.1's frequency-dependent rope scaling as the per-frequency divisors llama.cpp reads from the
    `rope_freqs` tensor (Meta's `apply_scaling`: high frequencies kept, low ones ÷ factor, smooth between)."""
    rope, dim = _rope(c), _head_dim(c)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) for every weight of a plain (merged) HF causal LM, in state-dict order."""
    import gguf

    c = model.config
    arch, permute = gguf_arch(c)
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    n_head = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_head
    tied = bool(getattr(c, "tie_word_embeddings", False))
    if _rope(c).get("rope_type") == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(c)
    for name, t in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the tied embedding serves as the output matrix
        if t.is_floating_point() is False:
            raise TunelabError(f"gguf export: {name} is not a float tensor ({t.dtype}); merge/dequantise first")
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise TunelabError(f"gguf export: no GGUF name for tensor '{name}' of a {c.model_type} model")
        t = t.detach().to("cpu", torch.float32)
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_rope(t, n_head)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_rope(t, n_kv)
        yield new, t

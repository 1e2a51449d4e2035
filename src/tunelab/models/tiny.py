"""Tiny random models built from transformers configs — for tests and quick experiments, no downloads.

`tiny_model("llama")` builds a 2-layer model of the named architecture with a small hidden size; the vocab
size defaults to SmolLM2's (49152) so it pairs with the offline SmolLM2 tokenizer.
"""

from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "mistral", "phi3", "gemma", "mixtral")


def tiny_config(arch: str, vocab_size: int = 49152, hidden: int = 64, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "phi3":
        return tf.Phi3Config(**common, pad_token_id=0)
    if arch == "gemma":
        return tf.GemmaConfig(**{**common, "tie_word_embeddings": True}, head_dim=16)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHS}")


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32)
    return model

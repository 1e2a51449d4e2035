"""Tiny random models built from transformers configs — for tests and quick experiments, no downloads.

`tiny_model("llama")` builds a 2-layer model of the named architecture with a small hidden size; the vocab
size defaults to SmolLM2's (49152) so it pairs with the offline SmolLM2 tokenizer.
"""

from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "mistral", "phi3", "gemma", "mixtral")
# Architectures whose lm_head output is transformed (Granite ÷ logits_scaling, Cohere × logit_scale, Gemma 2
# soft-capping), for tests of the chunked log-probs; set to non-neutral values so skipping them shows.
HEAD_ARCHS = ("granite", "cohere", "gemma2")
# Mixture-of-experts architectures, as real checkpoints configure them: output_router_logits stays off.
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


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
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
                                 shared_expert_intermediate_size=hidden)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden)
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2, eos_token_id=None)
    if arch == "granite":
        return tf.GraniteConfig(**common, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                attention_multiplier=0.25)
    if arch == "cohere":
        return tf.CohereConfig(**common, logit_scale=0.25, eos_token_id=None)
    if arch == "gemma2":
        return tf.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=16, final_logit_softcapping=0.5,
                               query_pre_attn_scalar=16)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHS + HEAD_ARCHS + MOE_ARCHS[1:]}")


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32)
    return model

"""Models: resolve a model reference (alias | local HF folder | .gguf | hub id) to an HF model + tokenizer
(`load.py`; aliases in `aliases.py`, tiny random test models in `tiny.py`), and module modes (`modes.py`).
May import: torch, transformers, gguf, safetensors, tunelab.errors, tunelab.console; nothing else of tunelab.
"""

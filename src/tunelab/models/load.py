"""Resolve a model reference and load (model, tokenizer).

A reference is one of: an alias (`smollm2-135m`), a local HF folder, a local `.gguf` file, or a Hugging Face
hub id (the real path for users; tests and the demo never touch the hub). GGUF files are converted once into
a cached safetensors folder (`$TUNELAB_CACHE` or `~/.cache/tunelab/models/<name>`), written atomically, so
every later load is a plain `from_pretrained` of a folder.

Defaults: fp32 on CPU, bf16 on CUDA; `trust_remote_code` only when the config asks for it, and weights are
read from safetensors only: a folder holding nothing but pickle weights (`pytorch_model.bin`, which can run
code when unpickled) is refused with one line unless the config says `model.allow_pickle: true`. The tokenizer's
pad token is set to eos when it has none (SmolLM2: pad == eos), which is why every forward pass in tunelab
passes an explicit attention mask.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from ..console import phase
from ..errors import TunelabError
from ..hub import OFFLINE_NOTE, go_offline_if_unreachable
from .aliases import ALIASES, HUB_IDS, alias_gguf


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def check_device(device: str, key: str = "model.device") -> torch.device:
    """`device` as a torch.device this machine has; one line naming `key` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise TunelabError(f"{key}: unknown device '{device}' (use auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TunelabError(f"{key}={device}: CUDA is not available on this machine (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TunelabError(f"{key}={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise TunelabError(f"{key}={device}: MPS is not available on this machine (use cpu or auto)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise TunelabError(f"{key}={device}: unsupported device type '{dev.type}' (use auto, cpu, cuda, mps)")
    return dev


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise TunelabError(f"model.dtype: unknown dtype '{dtype}' (use auto, float32, bfloat16, float16)")
    return table[dtype]


def gguf_to_folder(gguf: Path) -> Path:
    """Convert a GGUF file once into a safetensors HF folder; returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with phase(f"converting {gguf.name} to a safetensors folder (once; cached in {out.parent})", delay=2.0):
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
        try:
            try:
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32)
            except (ValueError, OSError, KeyError) as e:  # not GGUF, truncated, an architecture transformers lacks
                raise TunelabError(f"model not found: {gguf} is not a loadable GGUF file ({_first_line(e)})") from None
            # transformers marks GGUF-loaded models as "quantized" and refuses to save them; the weights are
            # already dequantized floats, so rebuild a plain model from the config and save that.
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(model.state_dict())
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            try:
                tmp.rename(out)
            except OSError:  # another process converted it first
                if not (out / "config.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(ref: str) -> str:
    """Turn a model reference into something `from_pretrained` accepts (a folder or a hub id)."""
    if ref in ALIASES:
        return str(gguf_to_folder(alias_gguf(ref)))
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunelabError(f"model not found: {ref} (no such .gguf file)")
        return str(gguf_to_folder(path))
    if path.exists():
        if not (path / "config.json").exists():
            raise TunelabError(f"model not found: {ref} is not a Hugging Face model folder (no config.json)")
        return str(path)
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep in ref and ref.count("/") != 1
    if looks_local or ref.count("/") != 1:
        raise TunelabError(f"model not found: '{ref}' is not an alias ({', '.join(ALIASES)}), "
                           "a folder, a .gguf file or a hub id like org/name")
    note = go_offline_if_unreachable()  # no network: the local cache only, at once, instead of a minute of retries
    if note:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(ref, "config.json"), str):
            raise TunelabError(f"model not found: '{ref}' is not in the local Hugging Face cache and {OFFLINE_NOTE}")
    return ref


def ecosystem_ref(ref: str) -> str:
    """The base-model reference to write where other tools read it (a PEFT `base_model_name_or_path`): what
    `AutoModelForCausalLM.from_pretrained` resolves outside tunelab. An alias becomes its hub id, a local folder
    its absolute path, a .gguf file the absolute path of its converted folder; a hub id (or anything else)
    stays as given. Never touches the network."""
    if ref in HUB_IDS:
        return HUB_IDS[ref]
    path = Path(ref).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(gguf_to_folder(path).resolve())
    if path.is_dir():
        return str(path.resolve())
    return ref


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve(ref), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TunelabError(f"model not found: cannot load tokenizer for '{ref}' ({str(e).splitlines()[0]})")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def sentencepiece_file(tok) -> Path | None:
    """The SentencePiece model (`tokenizer.model`) a tokenizer was loaded with, or None: transformers 5 keeps
    its path as `vocab_file`; a tokenizer class that does not declare it is found in the folder it came from."""
    for candidate in (tok.init_kwargs.get("vocab_file"), getattr(tok, "vocab_file", None)):
        if candidate and str(candidate).endswith(".model") and Path(candidate).is_file():
            return Path(candidate)
    folder = Path(str(getattr(tok, "name_or_path", "") or ""))
    if folder.parts and folder.is_dir() and (folder / "tokenizer.model").is_file():
        return folder / "tokenizer.model"
    return None


def save_tokenizer(tok, folder: str | Path) -> None:
    """`tok.save_pretrained(folder)` plus its `tokenizer.model`: transformers 5 writes only tokenizer.json, and a
    SentencePiece tokenizer's GGUF (llama.cpp's converter, tunelab's export) needs the piece scores in that file."""
    tok.save_pretrained(str(folder))
    src, dst = sentencepiece_file(tok), Path(folder) / "tokenizer.model"
    if src is not None and not dst.exists():
        shutil.copyfile(src, dst)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_weights_format(folder: str, allow_pickle: bool) -> None:
    """Refuse a local model folder whose weights exist only as pickle files, unless pickle is allowed."""
    path = Path(folder)
    if allow_pickle or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise TunelabError(f"model {folder} has only pickle weights ({pickles[0]}), which can run code when "
                           "loaded; convert it to safetensors or set model.allow_pickle=true")


def load_model(ref: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = None, allow_pickle: bool = False):
    """Load (model, tokenizer) for a model reference; the model is in train mode on `device`."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    folder = resolve(ref)
    check_weights_format(folder, allow_pickle)
    tok = load_tokenizer(ref, trust_remote_code)
    kwargs = dict(dtype=pick_dtype(dtype, dev), trust_remote_code=trust_remote_code,
                  use_safetensors=None if allow_pickle else True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except pickle.UnpicklingError as e:  # allow_pickle: torch.load(weights_only=True) met code, not tensors
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(("Trying", "Unsupported"))),
                   _first_line(e))
        raise TunelabError(f"model {ref}: torch refused to unpickle its weights, which hold more than tensors "
                           f"({why}); do not load it unless you trust its source") from None
    except OSError as e:
        raise TunelabError(f"model not found: '{ref}' ({_first_line(e)})") from None
    except (ValueError, ImportError) as e:
        if attn_implementation:  # transformers refuses an unknown or uninstalled attention backend this way
            raise TunelabError(f"model.attn_implementation={attn_implementation}: not usable with this model "
                               f"({_first_line(e)})") from None
        raise
    return model.to(dev), tok

"""Where a number was measured: the software versions and the machine, in one JSON-able dict.

Every run records `provenance()` in its ``results.json`` (the lab's report shows it and `tunelab compare` warns
when one study's runs came from different versions or machines); benchmarks record the same dict, so a
timing and a study verdict name their machine the same way.

    {"tunelab": "0.1.0", "git_commit": "c1de1be…" | None, "git_dirty": bool | None,
     "versions": {"python": "3.12.3", "torch": "2.13.0", "transformers": …, "tokenizers": …, "peft": …,
                  "trl": …, "datasets": …, "numpy": …, "safetensors": …}      (None when not installed),
     "machine": {"cpu": "AMD EPYC …", "cpu_flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile", …],
                 "cores": 2, "ram_gb": 7.8, "torch_cpu_capability": "AVX512", "gpu": "NVIDIA H100" | None,
                 "os": "Linux-6.8…"}}

`cpu_flags` lists only the flags that change what kernels torch can use (vector width, bf16/fp16 and AMX
matrix units); the full /proc/cpuinfo list would make every comparison differ on irrelevant bits.
Nothing here imports the rest of tunelab (the bottom of the layer order), and every probe is allowed to fail:
provenance must never be the reason a run stops.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "tokenizers", "peft", "trl", "datasets", "numpy", "safetensors")
FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "neon", "asimd", "sve")


def versions() -> dict:
    """Exact installed versions of the packages whose behaviour a run's numbers depend on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def tunelab_version() -> str | None:
    """The imported package's version (its ``__version__``; the installed metadata otherwise)."""
    import sys

    version = getattr(sys.modules.get(__package__ or "tunelab"), "__version__", None)
    if version:
        return version
    try:
        return metadata.version("tunelab")
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout tunelab is imported from; (None, None) for an installed wheel."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def _cpuinfo() -> tuple[str | None, list[str]]:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "cpu model") and model is None:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or None, [f for f in FLAGS_THAT_MATTER if f in flags]


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


@lru_cache(maxsize=1)
def machine() -> dict:
    """CPU model and the flags that matter, cores, RAM, torch's CPU kernel level, the GPU (if any), the OS."""
    cpu, flags = _cpuinfo()
    info = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "ram_gb": _ram_gb(),
            "torch_cpu_capability": None, "gpu": None, "os": platform.platform()}
    try:
        import torch

        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # provenance never stops a run
        pass
    return info


def provenance() -> dict:
    """Versions + machine (see the module docstring): what a result needs to be reproduced or questioned."""
    commit, dirty = git_state()
    return {"tunelab": tunelab_version(), "git_commit": commit, "git_dirty": dirty, "versions": versions(),
            "machine": machine()}


def same_setup_key(prov: dict | None) -> tuple:
    """What must agree between runs that are compared: versions and the machine (not the OS patch level)."""
    prov = prov or {}
    m = prov.get("machine") or {}
    return (prov.get("tunelab"), prov.get("git_commit"), tuple(sorted((prov.get("versions") or {}).items())),
            m.get("cpu"), tuple(m.get("cpu_flags") or ()), m.get("cores"), m.get("gpu"))


def describe(prov: dict | None) -> str:
    """One line: ``tunelab 0.1.0 (c1de1be) · torch 2.13.0 · transformers 5.24 · <CPU> (2 cores, avx2 …)``."""
    if not prov:
        return "provenance not recorded"
    v, m = prov.get("versions") or {}, prov.get("machine") or {}
    commit = (prov.get("git_commit") or "")[:7]
    parts = [f"tunelab {prov.get('tunelab')}" + (f" ({commit}{'+dirty' if prov.get('git_dirty') else ''})"
                                                 if commit else "")]
    parts += [f"{k} {v[k]}" for k in ("torch", "transformers") if v.get(k)]
    hw = f"{m.get('cpu') or 'unknown CPU'} ({m.get('cores')} cores, {m.get('ram_gb')} GB"
    hw += f", {' '.join(m.get('cpu_flags') or [])}" if m.get("cpu_flags") else ""
    hw += f", torch {m['torch_cpu_capability']})" if m.get("torch_cpu_capability") else ")"
    parts.append(hw)
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']}")
    return " · ".join(parts)

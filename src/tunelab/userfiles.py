"""The user's files and folders: reading text (configs, data) as UTF-8 with or without a byte-order mark,
checking that an output path can be written before the work that fills it, and never replacing a file tunelab did
not write — every failure one line naming the path (for bytes that are not UTF-8, the line they are on).

**One rule for every file tunelab writes where the user chose** (`tunelab report --out`, `export --gguf`,
`eval --output`): an existing file is replaced only when tunelab wrote it — or with ``--overwrite``. Proof that
tunelab wrote a file is an entry in the folder's ledger `LEDGER` (a small JSON file tunelab keeps beside what
it writes: each name's size, modification time in ns, and the SHA-256 of its first 64 KiB), recorded when the
file was written and still matching the file on disk; a file the user created, replaced or edited since does not
match, and is refused with one line (`check_replaceable`, then `write_file` / `note_written`). Writes are atomic:
a temporary file in the same folder renamed into place, so a failed write leaves the old file as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import TunelabError

LEDGER = ".tunelab-written.json"
BOM = "\ufeff"  # Windows editors (Notepad, Excel's "CSV UTF-8") start files with it


def not_utf8(path: Path, shown: str | None = None) -> TunelabError:
    """The error for a file that is not UTF-8: ``file:line: not UTF-8 text (byte 0xe9 at column 7)``."""
    shown = shown or str(path)
    try:
        raw = Path(path).read_bytes()
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return TunelabError(f"{shown}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                            "save the file as UTF-8")
    except OSError as e:
        return TunelabError(f"{shown}: cannot read ({e.strerror})")
    return TunelabError(f"{shown}: not UTF-8 text")


def read_text(path: Path, shown: str | None = None) -> str:
    """The whole file as text, a leading BOM removed; `TunelabError` naming `shown` (default: the path)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise not_utf8(path, shown) from None
    except OSError as e:
        raise TunelabError(f"{shown or path}: cannot read ({e.strerror})") from None
    return text[1:] if text.startswith(BOM) else text


def check_can_create(path: Path, what: str) -> None:
    """Refuse (one line naming `what`) an output path that cannot be made: a file where a folder is needed, or
    a place nothing can be written (a read-only mount, /proc). Leaves nothing behind."""
    path = Path(path)
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TunelabError(f"{what} {path}: cannot be created ({parent} is not a folder)")
    try:  # os.access says yes for root on /proc and on read-only mounts: try it
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".tmp-probe-"))
    except OSError as e:
        raise TunelabError(f"{what} {path}: cannot write in {parent} ({e.strerror})") from None


def make_folder(path: Path, what: str) -> Path:
    """`path` created (with its parents) if needed; one line naming `what` when that fails."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TunelabError(f"{what} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TunelabError(f"{what} {path}: cannot be created ({e.strerror})") from None
    return path


def _stamp(path: Path) -> dict:
    st = path.stat()
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(65536)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head": head}


def _ledger(folder: Path) -> dict:
    try:
        data = json.loads((folder / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def written_by_tunelab(path: Path) -> bool:
    """Is `path` a regular file that tunelab wrote and nobody changed since? (its ledger entry matches)"""
    path = Path(path)
    entry = _ledger(path.parent).get(path.name)
    try:
        return entry is not None and path.is_file() and not path.is_symlink() and entry == _stamp(path)
    except OSError:
        return False


def note_written(path: Path) -> None:
    """Record in the folder's ledger that tunelab just wrote `path` (best effort: a ledger that cannot be written
    only means the next write there asks for ``--overwrite``)."""
    path = Path(path)
    try:
        files = _ledger(path.parent)
        files[path.name] = _stamp(path)
        tmp = path.parent / f".tmp-{LEDGER}-{os.getpid()}"
        tmp.write_text(json.dumps({"written_by": "tunelab", "files": files}, indent=1), encoding="utf-8")
        os.replace(tmp, path.parent / LEDGER)
    except OSError:
        pass


def forget_written(path: Path) -> None:
    """Remove `path` (a file tunelab wrote, see `written_by_tunelab`) and its ledger entry."""
    path = Path(path)
    path.unlink(missing_ok=True)
    files = _ledger(path.parent)
    if files.pop(path.name, None) is not None:
        try:
            (path.parent / LEDGER).write_text(json.dumps({"written_by": "tunelab", "files": files}, indent=1),
                                              encoding="utf-8")
        except OSError:
            pass


def check_replaceable(path: Path, what: str, overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Refuse (one line naming `what` and the path) to replace an existing file tunelab did not write unless
    `overwrite`; something that is not a regular file (a folder, a FIFO, a device) is refused always."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise TunelabError(f"{what} {path}: exists and is {kind}")
    if overwrite or written_by_tunelab(path):
        return
    raise TunelabError(f"{what} {path}: exists and was not written by tunelab; pass {flag} to replace it, "
                       "or choose another path")


def write_file(path: Path, data: str | bytes, what: str, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Write `data` to `path` atomically under the rule above (`check_replaceable`), and record it as tunelab's.
    A full disk or an unwritable folder is one line; the old file, if any, is left as it was."""
    path = Path(path)
    check_replaceable(path, what, overwrite, flag)
    make_folder(path.parent, what)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    try:
        with tmp.open("wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TunelabError(f"{what} {path}: cannot write ({e.strerror})") from None
    note_written(path)
    return path

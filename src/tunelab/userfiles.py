"""The user's files and folders: reading text (configs, data) as UTF-8 with or without a byte-order mark, and
checking that an output path can be written before the work that fills it — every failure one line naming the
path (for bytes that are not UTF-8, the line they are on)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import TunelabError

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

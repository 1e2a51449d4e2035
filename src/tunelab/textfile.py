"""Reading the user's text files (configs, data): UTF-8 with or without a byte-order mark, and every failure as
one line naming the file — and for bytes that are not UTF-8, the line they are on."""

from __future__ import annotations

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

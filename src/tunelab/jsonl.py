"""Reading the JSON Lines logs a run appends to (metrics.jsonl, samples.jsonl, selected.jsonl).

A row is appended with one write of ``json + "\\n"``, so a process killed mid-write can leave only the LAST line
torn (cut short, no newline). That line is dropped — it is the row of a step the resumed run repeats — and, when
the caller is about to append again, removed from the file so the next row does not glue onto it. Any other
unreadable line was not written by a killed append; it is reported as ``file:line`` (`strict`) or skipped
(readers such as `tunelab report`, which should show what they can).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import TunelabError


def _parse(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def read_rows(path: Path, strict: bool = False, repair: bool = False) -> list[dict]:
    """The rows of `path` ([] if it does not exist); a torn last line is dropped (and cut from the file with
    `repair`); another unreadable line raises `TunelabError` with `strict`, else is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TunelabError(f"{path}: cannot read ({e.strerror})") from None
    lines = raw.split(b"\n")  # a complete file ends with "\n": its last piece is empty
    rows, torn = [], False
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse(line.decode("utf-8", errors="replace"))
        if row is not None:
            rows.append(row)
        elif i == len(lines):  # the last piece, without its newline: a write that was cut short
            torn = True
        elif strict:
            raise TunelabError(f"{path}:{i}: malformed log row (not a JSON object); fix or delete that line")
    if torn and repair:
        os.truncate(path, len(raw) - len(lines[-1]))  # keep every complete line byte for byte
    return rows

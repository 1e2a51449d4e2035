"""Read raw records from a file or a Hugging Face dataset, each tagged with where it came from.

Every record carries an `origin` string so that any later error ("missing field 'output'") can point at the
exact place to fix:

=============  ===================================  ==========================================
source         origin                               numbering
=============  ===================================  ==========================================
``.jsonl``     ``data.jsonl:17``                    physical line, 1-based (blank lines skipped)
``.json``      ``data.json:[3]``                    array index, 0-based
``.csv``       ``data.csv:5``                       line where the row starts, 1-based (header = 1)
``.parquet``   ``data.parquet:row 3``               row index, 0-based
HF dataset     ``org/name[train]:row 3``            row index, 0-based
=============  ===================================  ==========================================

A ``.json`` file may hold an array of objects or ``{"data": [...]}``. A ``.json`` file that is really JSON
Lines (a very common mislabel) is read as JSONL. Anything that is not an existing file and looks like
``name``, ``org/name`` or ``org/name:config`` is loaded with ``datasets.load_dataset`` (the real path for
users; tests only check that an unreachable hub gives a clean error).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunelabError
from ..hub import go_offline_if_unreachable
from ..userfiles import not_utf8, read_text

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# `name`, `org/name`, optionally `:config` — the shapes a hub dataset id can take.
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass
class Record:
    """One raw example: the parsed object and where it came from (``"file.jsonl:17"``)."""

    data: dict
    origin: str


def load_records(source: str, split: str | None = None, limit: int | None = None) -> list[Record]:
    """Load every record of `source` (a local file or a hub dataset id), in file order.

    `split` only applies to hub datasets (default ``"train"``); local files are a single split.
    `limit` keeps the first `limit` records (reading stops early where the format allows it).
    Raises `TunelabError` for a missing file, a malformed line, a non-object record or an empty dataset.
    """
    if limit is not None and limit <= 0:
        raise TunelabError(f"{source}: limit must be a positive number of records, got {limit}")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise TunelabError(f"{source}: is a directory; give a {'/'.join(FILE_SUFFIXES)} file")
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise TunelabError(f"{source}: unsupported file type '{suffix}' (use {', '.join(FILE_SUFFIXES)})")
        try:
            records = readers[suffix](path, source, limit)
        except UnicodeDecodeError:
            raise not_utf8(path, source) from None
        except OSError as e:  # unreadable (permissions), vanished meanwhile, an I/O error
            raise TunelabError(f"{source}: cannot read ({e.strerror})") from None
    elif suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")) or not _HF_ID.match(source):
        raise TunelabError(f"{source}: file not found")
    else:
        records = _read_hub(source, split or "train", limit)
    if not records:
        raise TunelabError(f"{source}: no records")
    return records[:limit] if limit is not None else records


def _expect_object(obj, origin: str) -> dict:
    if not isinstance(obj, dict):
        raise TunelabError(f"{origin}: expected a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(obj) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)


def _read_jsonl(path: Path, source: str, limit: int | None) -> list[Record]:
    records = []
    with path.open(encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is not part of line 1
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            origin = f"{source}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TunelabError(f"{origin}: malformed JSON: {e.msg} (column {e.colno})") from None
            records.append(Record(_expect_object(obj, origin), origin))
            if limit is not None and len(records) >= limit:
                break
    return records


def _read_json(path: Path, source: str, limit: int | None) -> list[Record]:
    text = read_text(path, source)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # "Extra data" after a complete first value is the signature of JSON Lines saved as .json.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path, source, limit)
        raise TunelabError(f"{source}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise TunelabError(f"{source}: expected a JSON array of objects or {{\"data\": [...]}}, "
                           f"got {_json_type(obj)}")
    return [Record(_expect_object(item, f"{source}:[{i}]"), f"{source}:[{i}]")
            for i, item in enumerate(obj[:limit] if limit is not None else obj)]


def _read_csv(path: Path, source: str, limit: int | None) -> list[Record]:
    records = []
    # newline="" lets the csv module handle quoted fields that contain line breaks.
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: no BOM glued to the first column's name
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        try:
            for row in reader:
                origin = f"{source}:{start}"
                if None in row:  # more cells than header columns: DictReader files them under key None
                    raise TunelabError(f"{origin}: row has more cells than the header has columns")
                # Fewer cells than columns give None values; keep them as missing-but-present keys.
                records.append(Record(dict(row), origin))
                start = reader.line_num + 1
                if limit is not None and len(records) >= limit:
                    break
        except csv.Error as e:
            raise TunelabError(f"{source}:{reader.line_num}: malformed CSV: {e}") from None
    return records


def _read_parquet(path: Path, source: str, limit: int | None) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for non-parquet bytes
        raise TunelabError(f"{source}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    records: list[Record] = []
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            records.append(Record(row, f"{source}:row {len(records)}"))
            if limit is not None and len(records) >= limit:
                return records
    return records


def _read_hub(source: str, split: str, limit: int | None) -> list[Record]:
    name, _, config = source.partition(":")
    note = go_offline_if_unreachable()
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, missing, gated, bad split… all surface as one user-facing line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TunelabError(f"{source}: cannot load dataset from the Hugging Face hub "
                           f"({type(e).__name__}: {first}{'; ' + note if note else ''})") from None
    n = len(ds) if limit is None else min(limit, len(ds))
    return [Record(dict(ds[i]), f"{name}[{split}]:row {i}") for i in range(n)]

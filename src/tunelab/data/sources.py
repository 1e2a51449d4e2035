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
``.txt``       ``notes.txt:1``                      the whole file is one document (``{"text": …}``)
HF dataset     ``org/name[train]:row 3``            row index, 0-based
=============  ===================================  ==========================================

A ``.txt`` file is read as ONE plain-text document — what continued pretraining expects: nothing is cut at
blank lines, and the encoder splits a long document into ``data.max_length`` chunks (`Record.document`)
instead of truncating it. A folder is every supported file under it (sorted by path, hidden ones skipped); a
glob (``corpus/*.txt``, ``shards/**/*.jsonl``) every file it matches, in sorted order.

A ``.json`` file may hold an array of objects or ``{"data": [...]}``. A ``.json`` file that is really JSON
Lines (a very common mislabel) is read as JSONL.

Bounded on hostile input: a record (a JSONL line, an element of a .json array) over `max_record_bytes()` (16 MB;
``TUNELAB_MAX_RECORD_MB`` changes it) is refused before it is parsed — a 50 MB line of tiny objects would take
gigabytes as Python objects — and so is a record nested over `MAX_DEPTH` levels (a chat record needs about 5).
A path that exists but is not a regular file (a FIFO, /dev/zero) is named as such, never read. Anything that is not an existing file and looks like
``name``, ``org/name`` or ``org/name:config`` is loaded with ``datasets.load_dataset`` (the real path for
users; tests only check that an unreachable hub gives a clean error).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunelabError
from ..hub import go_offline_if_unreachable
from ..userfiles import not_utf8, read_text

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# `name`, `org/name`, optionally `:config` — the shapes a hub dataset id can take.
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
MAX_DEPTH = 100  # nested arrays/objects in one record


def max_record_bytes() -> int:
    """The largest record read, in bytes: ``TUNELAB_MAX_RECORD_MB`` (default 16) MiB."""
    try:
        mb = float(os.environ.get("TUNELAB_MAX_RECORD_MB", "16"))
    except ValueError:
        raise TunelabError(f"TUNELAB_MAX_RECORD_MB={os.environ['TUNELAB_MAX_RECORD_MB']!r}: not a number") from None
    return max(1, int(mb * 2**20))


def _too_large(origin: str, size: str) -> TunelabError:
    return TunelabError(f"{origin}: record {size}over the {max_record_bytes() / 2**20:g} MB limit per record "
                        "(set TUNELAB_MAX_RECORD_MB to raise it)")


def _special_file(path: Path) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a folder (a FIFO, a device…)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


@dataclass
class Record:
    """One raw example: the parsed object and where it came from (``"file.jsonl:17"``)."""

    data: dict
    origin: str
    document: bool = False  # a whole plain-text document (a .txt file): split into chunks, never truncated


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
    files = source_files(source)
    if files is not None:
        records = []
        for f in files:
            records += load_records(f, limit=None if limit is None else limit - len(records))
            if limit is not None and len(records) >= limit:
                break
        return records
    special = _special_file(path)
    if special:
        raise TunelabError(f"{source}: not a regular file ({special}); give a {'/'.join(FILE_SUFFIXES)} file")
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
                   ".txt": _read_txt}
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


def source_files(source: str) -> list[str] | None:
    """The files a folder or a glob pattern stands for (sorted; supported suffixes only), or None when `source`
    is one file or a dataset id. A folder or pattern that names no supported file is an error."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise TunelabError(f"{source}: a folder with no {'/'.join(FILE_SUFFIXES)} file in it")
        return found
    if path.exists() or not any(c in source for c in "*?["):
        return None
    found = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not found:
        raise TunelabError(f"{source}: no file matches this pattern")
    unsupported = next((p for p in found if Path(p).suffix.lower() not in FILE_SUFFIXES), None)
    if unsupported:
        raise TunelabError(f"{unsupported} (matched by {source}): unsupported file type "
                           f"'{Path(unsupported).suffix}' (use {', '.join(FILE_SUFFIXES)})")
    return found


def _read_txt(path: Path, source: str, limit: int | None) -> list[Record]:
    """The whole file as one plain-text document (module docstring); an empty file holds no record."""
    text = read_text(path, source)
    return [Record({"text": text}, f"{source}:1", document=True)] if text.strip() else []


def _expect_object(obj, origin: str) -> dict:
    if not isinstance(obj, dict):
        raise TunelabError(f"{origin}: expected a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(obj) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)


def _parse(text: str, origin: str):
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TunelabError(f"{origin}: malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise TunelabError(f"{origin}: nested too deeply (over {MAX_DEPTH} levels)") from None
    _check_depth(obj, origin)
    return obj


def _check_depth(obj, origin: str) -> None:
    level = [obj]
    for _ in range(MAX_DEPTH):
        level = [c for o in level if isinstance(o, (dict, list)) for c in (o.values() if isinstance(o, dict) else o)]
        if not level:
            return
    if any(isinstance(o, (dict, list)) for o in level):
        raise TunelabError(f"{origin}: nested too deeply (over {MAX_DEPTH} levels)")


def _lines(path: Path, most: int):
    """(line number, text) of each line, read as bytes at most `most` + 1 at a time, so a line over `most` bytes
    is caught (yielded as None) without holding it; newlines as text mode reads them (\n, \r\n, \r)."""
    lineno = 0
    with path.open("rb") as f:
        first = True
        while True:
            raw = f.readline(most + 1)
            if not raw:
                return
            if len(raw) > most and not raw.endswith(b"\n"):
                yield lineno + 1, None
                return
            if first and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is not part of line 1
                raw = raw[3:]
            first = False
            text = raw.decode("utf-8")  # UnicodeDecodeError: load_records names the line
            for piece in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[:-1 if text.endswith(
                    ("\n", "\r")) else None]:
                lineno += 1
                yield lineno, piece


def _read_jsonl(path: Path, source: str, limit: int | None) -> list[Record]:
    records = []
    for lineno, line in _lines(path, max_record_bytes()):
        origin = f"{source}:{lineno}"
        if line is None:
            raise _too_large(origin, "")
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not records
        records.append(Record(_expect_object(_parse(line, origin), origin), origin))
        if limit is not None and len(records) >= limit:
            break
    return records


# a JSON string (skipped whole) or a bracket: enough to find where each record of a .json array starts and ends
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _check_record_sizes(text: str, source: str) -> None:
    """Refuse a .json file holding a record over the limit — found by a scan that builds no objects, before
    json.loads would build them. Records are the containers at depth 2 (``[{…}]``) or 3 (``{"data": [{…}]}``)."""
    most = max_record_bytes()
    if len(text) <= most:
        return
    depth, starts = 0, {}
    for m in _JSON_TOKEN.finditer(text):
        c = text[m.start()]
        if c == '"':
            continue
        if c in "[{":
            depth += 1
            starts[depth] = m.start()
        else:
            if depth in (2, 3) and m.end() - starts[depth] > most:
                start = starts[depth]
                raise _too_large(f"{source}:{text.count(chr(10), 0, start) + 1}",
                                 f"of {(m.end() - start) / 2**20:.1f} MB ")
            depth = max(depth - 1, 0)


def _read_json(path: Path, source: str, limit: int | None) -> list[Record]:
    text = read_text(path, source)
    _check_record_sizes(text, source)
    try:
        obj = json.loads(text)
    except RecursionError:
        raise TunelabError(f"{source}: nested too deeply (over {MAX_DEPTH} levels)") from None
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
    records = []
    for i, item in enumerate(obj[:limit] if limit is not None else obj):
        _check_depth(item, f"{source}:[{i}]")
        records.append(Record(_expect_object(item, f"{source}:[{i}]"), f"{source}:[{i}]"))
    return records


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

"""``data.columns``: a file's own column names renamed to the ones tunelab reads, before the format is detected.

    data.columns: {prompt: question, response: answer}

turns ``{"question": "2+2?", "answer": "4", "id": 7}`` into ``{"prompt": "2+2?", "response": "4", "id": 7}``:
each mapped column is renamed (its old name is gone, so a mapped preference column like ``chosen`` no longer
makes the record a preference pair), every other column is kept as it is. The same mapping applies to every
record of data.train and data.eval, local files and Hugging Face datasets alike; a record without a mapped
column is an error naming its ``file:line``.
"""

from __future__ import annotations

from ..errors import TunelabError
from .sources import Record


def rename_columns(records: list[Record], columns: dict[str, str]) -> list[Record]:
    """`records` with each `columns` value (the file's column) renamed to its key (the name tunelab reads)."""
    if not columns:
        return records
    renamed = set(columns.values())
    out = []
    for r in records:
        for name, column in columns.items():
            if column not in r.data:
                raise TunelabError(f"{r.origin}: no column '{column}' (data.columns maps {name} ← {column})")
        data = {k: v for k, v in r.data.items() if k not in renamed}
        data.update({name: r.data[column] for name, column in columns.items()})
        out.append(Record(data, r.origin, r.document))
    return out

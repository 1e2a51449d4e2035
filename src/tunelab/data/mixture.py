"""Several training files in one run: ``data.train: [{path: a.jsonl, weight: 0.7}, {path: b.jsonl, weight: 0.3}]``.

Without weights the files are concatenated in the order given. With weights (an item without one counts as
1), weight w_i is file i's sampling proportion p_i = w_i / Σw, and the mixed training set is drawn once:

* its size is N = Σ n_i, the files' training rows together (an epoch is as long as the concatenation);
* file i gives k_i rows, k_i = p_i·N rounded by largest remainder (Hamilton's method) so that Σ k_i = N;
* k_i ≤ n_i: a random subset of k_i of its rows, without repetition (subsampling);
  k_i > n_i: every row ⌊k_i/n_i⌋ times plus a random subset of k_i mod n_i rows (repetition);
* the random subsets come from `random.Random` seeded with (``train.seed``, file index): the same seed gives
  the same rows, on every machine and Python version (string seeds hash with SHA-512, not `hash()`).

Rows keep their file order within a file and their ``file:line`` origins; the loader shuffles batches per
epoch anyway. The held-out split is taken before mixing (`mix`'s `keep`), so no repeated row is held out too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import TunelabError
from .columns import rename_columns
from .sources import Record, load_records


@dataclass
class SourceRecords:
    """One ``data.train`` source after loading: its path, its weight (None: not given) and its records."""

    path: str
    weight: float | None
    records: list[Record]


def load_sources(sources, columns: dict[str, str] | None = None, split: str | None = None,
                 limit: int | None = None) -> list[SourceRecords]:
    """Load every source (items with `.path` and `.weight`), columns renamed; `limit` applies to each file."""
    return [SourceRecords(s.path, s.weight, rename_columns(load_records(s.path, split=split, limit=limit),
                                                           columns or {})) for s in sources]


def shares(sizes: list[int], weights: list[float]) -> list[int]:
    """k_i: how many rows each source gives to a mixture of N = Σ sizes rows (largest remainder)."""
    total, n = sum(weights), sum(sizes)
    exact = [w / total * n for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    return counts


def weighted(parts: list[SourceRecords]) -> bool:
    return any(p.weight is not None for p in parts)


def mix(parts: list[SourceRecords], seed: int, keep: list[Record] | None = None) -> list[Record]:
    """The training records of `parts` (module docstring's rule); `keep` (the records left after the held-out
    split) restricts every source to those records first."""
    if keep is not None:
        kept = {id(r) for r in keep}
        parts = [SourceRecords(p.path, p.weight, [r for r in p.records if id(r) in kept]) for p in parts]
    if not weighted(parts):
        return [r for p in parts for r in p.records]
    counts = shares([len(p.records) for p in parts], [1.0 if p.weight is None else p.weight for p in parts])
    out: list[Record] = []
    for i, (p, k) in enumerate(zip(parts, counts)):
        n = len(p.records)
        if k and not n:
            raise TunelabError(f"{p.path}: no training rows left after the held-out split (data.eval_fraction)")
        if not k:
            continue
        rng = random.Random(f"tunelab-mixture:{seed}:{i}")
        extra = sorted(rng.sample(range(n), k % n))
        out += p.records * (k // n) + [p.records[j] for j in extra]
    return out


def describe(parts: list[SourceRecords]) -> list[str]:
    """One line per source for `tunelab data inspect`: its rows and, in a weighted mixture, its share."""
    if not weighted(parts):
        return [f"{p.path}: {len(p.records)} rows" for p in parts]
    counts = shares([len(p.records) for p in parts], [1.0 if p.weight is None else p.weight for p in parts])
    total = sum(counts) or 1
    return [f"{p.path}: {len(p.records)} rows, weight {1.0 if p.weight is None else p.weight:g} → {k} rows "
            f"per epoch ({k / total:.0%} of the mixture)" for p, k in zip(parts, counts)]

"""The run config's ``data:`` section (`DataConfig`): which files train, how their columns are named, how they
are encoded. Kept apart from config.py (which embeds it) so the options and their rules read in one place.

``data.train`` is one source or a list of them; a source is a local file (.jsonl, .json, .csv, .parquet, .txt),
a folder or glob of such files, or a Hugging Face dataset id. A list item is a path or ``{path, weight}``:

    data:
      train:
        - {path: data/chat.jsonl, weight: 0.7}
        - {path: data/code.jsonl, weight: 0.3}
      columns: {prompt: question, response: answer}

**Mixture rule** (`data.mixture.mix`). Without any weight the files are concatenated. With weights, each
weight is a sampling proportion p_i = w_i / Σw (an item without a weight counts as 1). The mixed training set
has N = Σ n_i rows — as many as the files' training rows together, so an epoch stays the same size — and file
i gives k_i = p_i·N of them (rounded by largest remainder so they sum to N): a file with more rows than k_i
gives a random subset of k_i rows, a file with fewer repeats every row ⌊k_i/n_i⌋ times plus a random subset
of the remaining k_i mod n_i. The random subsets are drawn once per run from `train.seed` (the same seed, the
same rows). The held-out split (``data.eval_fraction``) is taken before mixing, so a repeated row never lands
in both sets. Every row keeps its ``file:line`` origin.

``data.columns`` maps the names tunelab reads (prompt, completion or response, instruction, input, output,
messages, text, chosen, rejected, …) to the columns a file has: ``{prompt: question, response: answer}``
renames ``question`` → ``prompt`` and ``answer`` → ``response`` in every record of data.train and data.eval
before the format is detected. A record without a mapped column is an error naming it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FORMATS = ("auto", "alpaca", "messages", "prompt_completion", "text", "preference", "unpaired")


class TrainSource(BaseModel):
    """One item of a ``data.train`` list: a path (or dataset id) and its sampling weight (None: not given)."""

    model_config = ConfigDict(extra="forbid")
    path: str
    weight: float | None = None


def _source(item, i: int) -> TrainSource:
    """A ``data.train`` list item checked by hand, so a bad one gets one plain sentence (pydantic's union errors
    would list every member it tried)."""
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"item {i}: an empty path")
        return TrainSource(path=item)
    if not isinstance(item, dict):
        raise ValueError(f"item {i}: expected a path or {{path, weight}}, got {type(item).__name__}")
    unknown = sorted(set(item) - {"path", "weight"})
    if unknown:
        raise ValueError(f"item {i}: unknown key {unknown[0]!r} (an item has path and weight)")
    path, weight = item.get("path"), item.get("weight")
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"item {i}: needs a path")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"item {i} ({path}): weight must be a positive number, got {weight!r}")
        if weight <= 0:
            raise ValueError(f"item {i} ({path}): weight must be positive, got {weight!r}")
    return TrainSource(path=path, weight=None if weight is None else float(weight))


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    # a path/dataset id, or a list of them, each a path or {path, weight} (the mixture rule: module docstring)
    train: str | list[TrainSource] | None = None
    eval: str | None = None
    columns: dict[str, str] = {}  # {name tunelab reads: the file's column}, e.g. {prompt: question}
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    eval_max: int = Field(64, ge=0)
    # text: plain text (a .txt file is one document, split into data.max_length chunks, every token trained)
    format: Literal[FORMATS] = "auto"
    split: str | None = None
    limit: int | None = Field(None, ge=1)  # the first records of each file
    template: str = "auto"
    masking: Literal["prompt", "none", "template"] = "prompt"
    turns: Literal["all", "last"] = "all"
    max_length: int = Field(1024, ge=8)
    # plain-text records ({"text": …}) longer than max_length: `truncate` keeps the first max_length tokens (as
    # SFTTrainer does), `chunk` splits them into consecutive max_length pieces, every token trained (as a .txt file)
    long_text: Literal["truncate", "chunk"] = "truncate"
    packing: bool = True
    group_by_length: bool = False  # unpacked rows only: batches of similar lengths (less padding)

    @field_validator("train", mode="before")
    @classmethod
    def _train_sources(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list; give at least one file")
            return [_source(item, i) for i, item in enumerate(v)]
        return v

    @field_validator("columns", mode="before")
    @classmethod
    def _columns(cls, v):
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("expected a mapping {name tunelab reads: your column}, e.g. {prompt: question}")
        for name, column in v.items():
            if not isinstance(name, str) or not name or not isinstance(column, str) or not column:
                raise ValueError(f"{name!r}: {column!r}: both sides must be column names")
        sources = list(v.values())
        twice = next((c for c in sources if sources.count(c) > 1), None)
        if twice is not None:
            raise ValueError(f"column {twice!r} is mapped twice (a column is renamed to one name)")
        return v

    def train_sources(self) -> list[TrainSource]:
        """``data.train`` as a list of sources (one for a plain path; none when unset)."""
        if self.train is None:
            return []
        return [TrainSource(path=self.train)] if isinstance(self.train, str) else list(self.train)

    def train_paths(self) -> str:
        """``data.train`` for a message: the path, or the paths joined by ", "."""
        return ", ".join(s.path for s in self.train_sources())

"""The whole data path in one call: source → records → samples → segments → encoded examples.

This is what the config/CLI layer wires up; each stage is also usable on its own (see architecture.md).
"""

from __future__ import annotations

from .columns import rename_columns
from .formats import to_sample
from .masking import DataStats, Encoded, check_options, encode_dataset
from .sources import load_records
from .templates import Template, get_template


def build_examples(source: str, tokenizer, *, fmt: str = "auto", template: str | Template = "auto",
                   mode: str = "prompt", turns: str = "all", max_length: int | None = None,
                   split: str | None = None, limit: int | None = None,
                   require_assistant: bool = True,
                   columns: dict[str, str] | None = None) -> tuple[list[Encoded], DataStats, Template]:
    """Load `source` (its columns renamed by `columns`, as ``data.columns``) and encode it for SFT. Returns
    (examples, stats, template).

    Options are validated before any file is read, so a typo fails fast. Keep the returned template's
    `jinja` with the run (save it as the tokenizer's ``chat_template``) so generation formats prompts the same.
    """
    check_options(mode, turns)
    tmpl = template if isinstance(template, Template) else get_template(template, tokenizer)
    records = rename_columns(load_records(source, split=split, limit=limit), columns or {})
    samples = [to_sample(r, fmt, require_assistant=require_assistant) for r in records]
    examples, stats = encode_dataset(tokenizer, samples, tmpl, mode=mode, turns=turns, max_length=max_length)
    return examples, stats, tmpl

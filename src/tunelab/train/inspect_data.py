"""`tunelab data inspect CONFIG`: the run's data shown exactly as its objective trains on it.

The config's objective names its data kind (`data.kinds`, ``prompts`` from `rl/prompts.py`), and the kind says
what a training example is: SFT shows its masked examples (preference pairs only once a column is mapped:
``data.columns: {response: chosen}``), preference objectives their chosen and rejected responses, KTO its
labelled completions, and an online RL objective (grpo, ppo, …) its prompts, none of whose tokens is a target.
Several data.train files are listed first, each with its rows and its share of the weighted mixture (on
stderr). The same records, template and options as the run, through the same code — so what is shown is what
trains.
"""

from __future__ import annotations

from ..console import console as messages
from ..data.inspect import inspect_examples
from ..data.kinds import data_kind
from ..data.mixture import describe, load_sources, mix
from ..data.templates import get_template
from ..errors import TunelabError
from ..models.load import load_tokenizer
from .. import rl  # noqa: F401  (registers the `prompts` data kind of online RL)
from ..objectives import objective_class


def inspect_data(cfg, n: int = 3, as_json: bool = False, console=None) -> list[dict]:
    """Print (rich view, or JSON with `as_json`) and return the first `n` training examples of RunConfig `cfg`."""
    d = cfg.data
    if not d.train:
        raise TunelabError("data.train: no training data given")
    kind = data_kind(objective_class(cfg.objective).data_kind)
    kind.check(cfg)
    tok = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    sources = d.train_sources()
    # one file: its first rows are enough to show; several: every row, for the per-file counts and the mixture
    parts = load_sources(sources, d.columns, d.split, d.limit if d.limit or len(sources) > 1 else max(n, 1) * 50)
    records = mix(parts, cfg.train.seed)
    examples, stats = kind.inspect(tok, get_template(d.template, tok), records, cfg, max(n, 0))
    if len(parts) > 1:  # on stderr (the shared console), so --json stays one JSON document on stdout
        messages.print("\n".join(["data.train sources:"] + describe(parts)), markup=False, highlight=False,
                       soft_wrap=True)
    return inspect_examples(examples, tok, n=len(examples), stats=stats, as_json=as_json, console=console)

"""Load and validate everything a run needs — model, template, data, adapter — before anything is written.

Every check that user input can fail (config, data, template, model, target patterns, a method refusing the
data, the optimizer's settings, the reference's options, reward functions, trackers) happens here, so a bad run
stops with one line and leaves no run directory behind. What differs per objective comes from the objective's data kind (`data.kinds`) and its optional `prepare_model` hook (a reward
model's scalar head); this module names no objective and no method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import AdapterReport, apply_method, check_method_data
from ..adapters.init_from import init_adapter
from ..config import RunConfig, method_options
from ..data.columns import rename_columns
from ..data.kinds import data_kind
from ..data.mixture import load_sources, mix
from ..data.sources import load_records
from ..data.templates import Template, get_template
from ..errors import TunelabError
from ..models.compiling import check_compile
from ..models.load import load_model, pick_device
from .. import rl  # noqa: F401  (registers the `prompts` data kind of online RL)
from ..objectives import objective_class
from ..objectives.reference import check_reference
from .log import check_trackers
from .distributed import launched
from .optim import check_optimizer
from .task_eval import check_tasks


@dataclass
class RunInputs:
    """A validated run, in memory: the (wrapped) model, its tokenizer and template, encoded data, the adapter
    report and the rendered held-out generation prompts."""

    model: torch.nn.Module
    tokenizer: object
    template: Template
    train: list
    eval: list
    eval_prompts: list[str]
    stats: dict
    report: AdapterReport


def split_records(records: list, cfg: RunConfig) -> tuple[list, list]:
    """(train, held-out): `data.eval` if given, else a seeded `eval_fraction` of train capped at `eval_max`."""
    if cfg.data.eval:
        return records, rename_columns(load_records(cfg.data.eval, split=cfg.data.split), cfg.data.columns)
    n_eval = min(cfg.data.eval_max, int(round(len(records) * cfg.data.eval_fraction)))
    if n_eval == 0:
        return records, []
    g = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(records), generator=g).tolist()
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def run_records(cfg: RunConfig) -> tuple[list, list]:
    """(train, held-out) records of the run: data.train's sources loaded (columns renamed), the held-out split
    taken, then the training rows mixed by their weights (`data.mixture`)."""
    parts = load_sources(cfg.data.train_sources(), cfg.data.columns, cfg.data.split, cfg.data.limit)
    train_recs, eval_recs = split_records([r for p in parts for r in p.records], cfg)
    return mix(parts, cfg.train.seed, keep=train_recs), eval_recs


def prepare(cfg: RunConfig) -> RunInputs:
    """Load and validate model, data and method for `cfg`; nothing is written to disk."""
    if not cfg.data.train:
        raise TunelabError("data.train: no training data given (a .jsonl/.json/.csv/.parquet/.txt file, a folder, "
                           "a list of files or a dataset name)")
    objective = objective_class(cfg.objective)
    kind = data_kind(objective.data_kind)
    kind.check(cfg)
    objective.check_config(cfg)
    check_optimizer(cfg.train)
    if cfg.train.compile:
        check_compile(pick_device(cfg.model.device), launched())
    check_tasks(cfg)
    check_trackers(cfg.train.trackers)  # a missing tracker is one line now, not a traceback mid-run
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code,
                            cfg.model.attn_implementation, cfg.model.allow_pickle)
    template = get_template(cfg.data.template, tok)
    train_recs, eval_recs = run_records(cfg)
    data = kind.encode(tok, template, train_recs, eval_recs, cfg)
    objective.check_data(data.stats, cfg)
    torch.manual_seed(cfg.train.seed)  # adapter (and head) init is random: same config, same initial weights
    check_method_data(cfg.method, data.train + data.eval)
    report = apply_method(model, cfg.method, method_options(cfg))
    if getattr(method_options(cfg), "init_from", None):  # a saved adapter's weights before step 0
        report.notes.append(init_adapter(model, cfg.method, method_options(cfg).init_from))
    objective.prepare_model(model, cfg)
    if objective.wants_reference(cfg):
        check_reference(cfg.reference, model)
    return RunInputs(model, tok, template, data.train, data.eval, data.eval_prompts, data.stats, report)

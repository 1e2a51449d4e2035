"""The objectives' registry — the one list of valid objective names — and the run-config schema composed from it.

An objective describes itself (see `base.RunHooks`): a class with a ``name``, an ``Options`` class (a
`config.Strict` model: its config section, named like the objective — ``dpo:``, ``grpo:`` …; None when it has no
options) and a ``from_config(cfg, reference)`` constructor that reads only ``cfg.<name>`` and the truly shared
sections (``train`` for the loss chunk size, ``rl`` for the rollouts' sampling settings). Registering it is one
line in `_BUILTIN` (or `register(cls)` from anywhere, e.g. a test or a plugin); no other file changes.

config.py sits above this package, so it cannot see the objectives: its `RunConfig` holds the shared sections,
and `run_config_schema()` composes the full schema — `RunConfig` plus one section per registered objective that
has options, ``objective`` validated against the registry, and the options that moved out of the old shared
``pref:`` / ``rl:`` sections (each options class lists them in ``moved_from``) read from their old place. Every
loader of a run config (cli, train, pipeline stages, sweeps, run loaders) goes through `load_run_config` /
`validate_run_config`, so they all see the same schema.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pydantic import BaseModel, Field, create_model

from ..config import RunConfig, load_config
from ..errors import TunelabError

# name -> "module:Class" (imported on first use, like adapters.base's method table). One line per objective.
_BUILTIN = {
    "sft": "tunelab.objectives.sft:SFT",
    "dpo": "tunelab.objectives.dpo:DPO",
    "simpo": "tunelab.objectives.simpo:SimPO",
    "orpo": "tunelab.objectives.orpo:ORPO",
    "kto": "tunelab.objectives.kto:KTO",
    "reward": "tunelab.objectives.reward:RewardModelObjective",
    "rejection_sampling": "tunelab.objectives.rejection_sampling:RejectionSampling",
    "online_dpo": "tunelab.objectives.online_dpo:OnlineDPO",
    "grpo": "tunelab.objectives.grpo:GRPO",
    "rloo": "tunelab.objectives.grpo:RLOO",
    "ppo": "tunelab.objectives.ppo:PPO",
}


class _Registry(dict):
    """name -> objective class; built-in classes are imported when first looked up."""

    def __missing__(self, name: str):
        if name not in _BUILTIN:
            raise KeyError(name)
        module, cls = _BUILTIN[name].split(":")
        self[name] = getattr(importlib.import_module(module), cls)
        return self[name]

    def names(self) -> list[str]:
        return list(dict.fromkeys([*_BUILTIN, *self.keys()]))

    def all(self) -> dict[str, type]:
        return {n: self[n] for n in self.names()}


OBJECTIVES = _Registry()


def register(cls):
    """Add (or replace) an objective class under ``cls.name``; usable as a class decorator."""
    OBJECTIVES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove an objective added with `register` (built-in ones return to their module's class)."""
    OBJECTIVES.pop(name, None)


def objective_names() -> list[str]:
    return OBJECTIVES.names()


def objective_class(name: str):
    """The registered class of objective `name` (one `TunelabError` line when there is none)."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise TunelabError(f"unknown objective {name!r}; choose from {', '.join(objective_names())}") from None


def build_objective(cfg, reference=None):
    """The objective of run config `cfg`; `reference` (a `reference.Reference`) only for objectives that need
    one, and may be None when reference log-probs are precomputed into the batches."""
    return objective_class(cfg.objective).from_config(cfg, reference)


def moved_options(options: type[BaseModel] | None) -> dict[str, str]:
    """Old dotted key -> field, over the options class and its bases (``moved_from`` of each)."""
    out: dict[str, str] = {}
    for klass in reversed(getattr(options, "__mro__", ())):
        out.update(vars(klass).get("moved_from", {}))
    return out


_schemas: dict[tuple, type[RunConfig]] = {}


def run_config_schema() -> type[RunConfig]:
    """`config.RunConfig` + one section per registered objective's options (cached per registry state)."""
    objectives = OBJECTIVES.all()
    key = tuple((name, cls.Options) for name, cls in objectives.items())
    if key not in _schemas:
        sections = {name: (cls.Options, Field(default_factory=cls.Options))
                    for name, cls in objectives.items() if cls.Options is not None}
        clash = sorted(set(sections) & set(RunConfig.model_fields))
        if clash:
            raise TunelabError(f"objective {clash[0]!r}: its options section would replace the shared "
                               f"`{clash[0]}:` section; rename the objective")
        schema = create_model("RunConfig", __base__=RunConfig, __module__=__name__, **sections)
        moved: dict[str, list[str]] = {}
        for name, cls in objectives.items():
            for old, field in moved_options(cls.Options).items():
                moved.setdefault(old, []).append(f"{name}.{field}")
        schema.OBJECTIVE_NAMES = tuple(objectives)
        schema.MOVED = {old: tuple(new) for old, new in moved.items()}
        _schemas[key] = schema
    return _schemas[key]


def load_run_config(path: str | Path | None, overrides=()) -> RunConfig:
    """A run config file (+ ``key=value`` overrides) validated by the composed schema; errors name file:line."""
    return load_config(path, list(overrides), schema=run_config_schema())


def validate_run_config(raw) -> RunConfig:
    """A run config mapping (or a `RunConfig` built without the registry) validated by the composed schema."""
    schema = run_config_schema()
    if isinstance(raw, schema):
        return raw
    if isinstance(raw, BaseModel):
        raw = raw.model_dump(exclude_unset=True)
    return schema.model_validate(raw)

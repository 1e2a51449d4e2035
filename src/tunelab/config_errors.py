"""A config's validation errors as the user reads them: every one at once, one line each, each naming where it
is (``file:line``, or ``override``) and, for a key that does not exist, the key that was probably meant.

    c.yaml:7: lora.rank: unknown key (did you mean lora.r?)
    c.yaml:12: train.lrr: unknown key (did you mean train.lr?)
    override: train.batch_size: Input should be a valid integer (got 'many')

Suggestions come from the schema itself: the names in the section where the key was written (difflib's closest
match, or the name other trainers use for it — PEFT's ``lora_alpha``, TRL's ``learning_rate``, Axolotl's
``micro_batch_size``), else a section's or key's exact name in a sibling section (``r`` under ``train:`` →
``lora.r``), so a key in the wrong section is found too.
"""

from __future__ import annotations

import difflib
import types
import typing

from pydantic import BaseModel, ValidationError

from .errors import TunelabErrors

# names other fine-tuning tools use → tunelab's (suggested only when the target exists in that section)
SYNONYMS = {"rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
            "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
            "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum",
            "max_seq_length": "max_length", "max_seq_len": "max_length", "sequence_len": "max_length",
            "cutoff_len": "max_length", "lr_scheduler_type": "scheduler", "lr_scheduler": "scheduler",
            "warmup": "warmup_steps", "target": "target_modules", "lora_target_modules": "target_modules",
            "lora_target": "target_modules", "dataset": "train", "datasets": "train", "model_name": "name",
            "base_model": "name", "model_name_or_path": "name", "output": "output_dir", "seed_value": "seed",
            "num_generations": "group_size", "max_completion_length": "max_new_tokens", "kl_coef": "beta",
            "max_steps_per_epoch": "max_steps", "optim": "optimizer"}


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model class inside an annotation (``X``, ``X | None``, …), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found:
                return found
    return None


def _key_path(schema: type[BaseModel], loc: tuple, unknown: bool) -> tuple[str, ...]:
    """The dotted key path of an error's `loc`, without the union-member tags pydantic puts in it (``str``,
    ``list[str]``); for an unknown key (`unknown`), its last part is the key as written."""
    path: list[str] = []
    model: type[BaseModel] | None = schema
    for i, part in enumerate(loc):
        if model is not None and part in model.model_fields:
            path.append(part)
            model = _model_in(model.model_fields[part].annotation)
        elif (unknown and i == len(loc) - 1) or isinstance(part, int) or (model is None and not _is_tag(part)):
            path.append(str(part))
    return tuple(path)


def _is_tag(part) -> bool:  # pydantic names a union member it tried, e.g. 'str', 'list[str]', 'function-after[…]'
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none", "dict", "list"))


def _section(schema: type[BaseModel], section) -> type[BaseModel] | None:
    model: type[BaseModel] | None = schema
    for part in section:
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return model


def suggestion(schema: type[BaseModel], path: tuple[str, ...]) -> str | None:
    """The key probably meant instead of the unknown `path` (dotted), or None: the other tools' name for a key
    of this section, then the exact name in a sibling section, then the closest name in this section."""
    *section, key = path
    model = _section(schema, section)
    if model is None:
        return None
    low = key.lower()
    want = SYNONYMS.get(low, low)
    prefix = "".join(f"{s}." for s in section)
    if want in model.model_fields:
        return prefix + want
    parent = _section(schema, section[:-1]) if section else schema
    for name, field in parent.model_fields.items():
        sub = _model_in(field.annotation)
        if sub is not None and sub is not model and want in sub.model_fields:
            return "".join(f"{s}." for s in section[:-1]) + f"{name}.{want}"
    stems = [low, low.removeprefix(f"{section[-1]}_")] if section else [low]
    for stem in stems:
        close = difflib.get_close_matches(stem, list(model.model_fields), n=1, cutoff=0.6)
        if close:
            return prefix + close[0]
    return None


def config_errors(exc: ValidationError, schema: type[BaseModel], shown: str, lines: dict[tuple[str, ...], int],
                  from_override: set[tuple[str, ...]], elsewhere: str = "override", locate=None) -> TunelabErrors:
    """One line per distinct key that failed validation (in file order), as the module docstring shows; a key
    with no line in `lines` is said to be in `elsewhere`, prefixed by `locate(path)` when given (a pipeline
    stage's ``file:line: ``)."""
    found: dict[tuple[str, ...], str] = {}
    for err in exc.errors():
        path = _key_path(schema, tuple(err["loc"]), err["type"] == "extra_forbidden")
        if path in found:  # one line per key: a union reports each member it tried
            continue
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            meant = suggestion(schema, path)
            if meant:
                msg += f" (did you mean {meant}?)"
        else:
            msg = err["msg"].removeprefix("Value error, ")  # a field validator's own message
            # a validator's own message that names what it got, or names the culprit inside a whole list or
            # mapping (which would echo the section back), is complete without the input repeated
            whole = err["type"] == "value_error" and isinstance(err.get("input"), (list, dict))
            echo = "got " not in msg and not whole
            if "input" in err and echo:
                got = repr(err["input"])
                msg += f" (got {got if len(got) <= 80 else got[:77] + '...'})"
        key = next((path[:i] for i in range(len(path), 0, -1) if path[:i] in lines), None)
        where = "override" if path in from_override else elsewhere if key is None else f"{shown}:{lines[key]}"
        if locate is not None and key is None and path not in from_override:
            where = locate(path) + where
        found[path] = f"{where}: {'.'.join(path)}: {msg}"
    ordered = sorted(found.values(), key=lambda m: (not m.startswith(shown + ":"), _line_of(m, shown)))
    return TunelabErrors(ordered)


def _line_of(message: str, shown: str) -> int:
    head = message[len(shown) + 1:].split(":", 1)[0]
    return int(head) if head.isdigit() else 0

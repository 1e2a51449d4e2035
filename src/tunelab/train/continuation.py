"""Where a run starts when it does not start from scratch: its own checkpoint, a finished run it extends, or another
run's checkpoint (`train.resume_from`). All checked before anything is loaded or written, each failure one line.

    resume (default)        the run folder holds a checkpoint: the run continues from its newest intact one
                            (`loop.fit`); an interrupted run (Ctrl-C: train/interrupt.py, or a kill) is re-run with
                            the same command
    extend a finished run   the folder holds a finished run (results.json) and `train.max_steps` is now larger than
                            its step count: it continues from the checkpoint of its final step (written whenever
                            `train.save_every` is set) to the new total. The learning-rate schedule is recomputed
                            for the new total and followed from the continued step (`loop.follow_schedule`);
                            results.json and its budget then cover the whole run (steps, tokens, seconds of every
                            part). A smaller `train.max_steps` than the finished run took is refused; the same
                            `max_steps` is the "holds a finished run" refusal of `rundir`.
    train.resume_from       a checkpoint folder (or a run folder: its newest checkpoint) of this or another run, used
                            when the run folder has no checkpoint of its own: weights, optimizer, scheduler, RNG and
                            step are restored from it, and the run goes on to its own `train.max_steps`; its
                            results.json counts the whole lineage (steps, tokens and seconds up to the checkpoint
                            included), and its metrics.jsonl starts at the step after it

A checkpoint only fits a run with the same model and the same method settings (its tensors' names and shapes);
`check_compatible` compares the checkpoint's run config.yaml with this config and names the first difference,
before minutes of loading. What may differ: the data, the objective, the learning rate, the step count.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import TunelabError
from .checkpoint import complete_checkpoints
from .checkpoint_files import damage
from .rundir import run_marker

# method-section options that change no tensor name or shape (a checkpoint continues under either value)
_FREE_OPTIONS = {"init_from", "dropout"}


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def finished_steps(out: Path) -> int | None:
    """The step count of the finished run in tunelab folder `out` (results.json), or None: not finished."""
    if run_marker(out) is None:
        return None
    try:
        return int(json.loads((out / "results.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def extending(cfg) -> int | None:
    """The finished run's step count when `cfg` extends the run in its output_dir (module docstring), else None."""
    out = Path(cfg.output_dir)
    if cfg.overwrite or not cfg.resume or not out.is_dir():
        return None
    finished = finished_steps(out)
    want = cfg.train.max_steps
    if finished is None or not want or want == finished:
        return None
    if want < finished:
        raise TunelabError(f"train.max_steps={want} is below the {finished} steps of the finished run in {out}; "
                           "raise it to continue that run, or pass overwrite=true to start over")
    kept = complete_checkpoints(out / "checkpoints")
    if not kept or step_of(kept[-1]) < finished:
        raise TunelabError(f"output_dir {out}: the finished run kept no checkpoint of its step {finished} "
                           "(train.save_every was not set), so it cannot be continued; start a new run from its "
                           f"adapter (lora.init_from={out}) or pass overwrite=true")
    check_compatible(out / "config.yaml", cfg, f"output_dir {out}")
    return finished


def check_own_checkpoint(cfg) -> None:
    """A run folder with a checkpoint is resumed (unless resume=false / overwrite=true): the checkpoint must fit
    this config, and lie within its train.max_steps."""
    out = Path(cfg.output_dir)
    if cfg.overwrite or not cfg.resume or not out.is_dir():
        return
    kept = complete_checkpoints(out / "checkpoints")
    if not kept:
        return
    check_compatible(out / "config.yaml", cfg, f"output_dir {out}")
    if cfg.train.max_steps and step_of(kept[-1]) > cfg.train.max_steps:
        raise TunelabError(f"train.max_steps={cfg.train.max_steps} is below the step of the checkpoint the run in "
                           f"{out} would resume from ({kept[-1].name}); raise it, or pass overwrite=true to start over")


def _model_ref(name) -> str:
    path = Path(str(name))
    return str(path.resolve()) if path.exists() else str(name)


def check_compatible(saved_config: Path, cfg, where: str) -> None:
    """One line naming the first difference in model or method settings between the run that wrote `saved_config`
    and `cfg` (a missing or unreadable config.yaml is not checked: the tensors are, on loading)."""
    try:
        saved = yaml.safe_load(saved_config.read_text())
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(saved, dict):
        return
    then = (saved.get("model") or {}).get("name")
    if then is not None and _model_ref(then) != _model_ref(cfg.model.name):
        raise TunelabError(f"{where}: trained model.name={then}, this config has model.name={cfg.model.name}")
    if saved.get("method", cfg.method) != cfg.method:
        raise TunelabError(f"{where}: trained method={saved['method']}, this config has method={cfg.method}")
    options = getattr(cfg, cfg.method, None)
    now = options.model_dump(mode="json") if options is not None else {}
    for key, value in (saved.get(cfg.method) or {}).items():
        if key not in _FREE_OPTIONS and key in now and now[key] != value:
            raise TunelabError(f"{where}: trained {cfg.method}.{key}={value}, this config has "
                               f"{cfg.method}.{key}={now[key]}")


def checkpoint_source(cfg) -> Path | None:
    """The checkpoint `train.resume_from` names, verified and checked against `cfg`; None when it is not set."""
    given = cfg.train.resume_from
    if not given:
        return None
    path = Path(given)
    if not path.is_dir():
        raise TunelabError(f"train.resume_from: {path} is not a folder (a checkpoint folder, e.g. "
                           "runs/x/checkpoints/step-000040, or a run folder)")
    if (path / "checkpoints").is_dir() and not (path / "COMPLETE").exists():  # a run folder: its newest checkpoint
        kept = complete_checkpoints(path / "checkpoints")
        if not kept:
            raise TunelabError(f"train.resume_from: {path} holds no complete checkpoint")
        path = kept[-1]
    if not (path / "COMPLETE").exists() or not (path / "state.json").exists():
        raise TunelabError(f"train.resume_from: {path} is not a complete tunelab checkpoint (no COMPLETE, state.json)")
    problem = damage(path)
    if problem is not None:
        raise TunelabError(f"train.resume_from: {path} is damaged ({problem})")
    check_compatible(path.parent.parent / "config.yaml", cfg, f"train.resume_from {path}")
    step = json.loads((path / "state.json").read_text()).get("step", 0)
    if cfg.train.max_steps and step >= cfg.train.max_steps:
        raise TunelabError(f"train.resume_from: {path} was taken at step {step}; train.max_steps="
                           f"{cfg.train.max_steps} leaves nothing to train (raise it)")
    return path

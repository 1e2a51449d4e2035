"""Your own reward function, ``name: "module:function"`` in ``rl.rewards``: found, checked, called with a time
limit, its answer checked.

**Where the module is found.** The usual import path first; then, when Python cannot find ``module`` there,
the folder of the config file (`config.CONFIG_DIRS`: every config loaded in this process, newest first) and the
working directory — so ``my_rewards.py`` next to ``my_run.yaml`` or in the folder you run from works without
``PYTHONPATH=.``. The folder it was found in is added to the end of ``sys.path`` (the module may import its
neighbours).

**Two signatures**, told apart by their parameter names (TRL's: a first parameter ``prompts``,
``completions`` or ``completion_ids``, or a ``completions`` parameter anywhere) and checked before the first
rollout (a mismatch is one line naming both):

    def fn(batch, **options) -> list[float]                 # tunelab: batch is an rl.rewards.RewardInputs
    def fn(completions, **kwargs) -> list[float]            # TRL (GRPOTrainer's reward functions), also
    def fn(prompts, completions, answer, **kwargs)          # naming what it reads

A TRL-style function is called as TRL calls it, with keywords: ``prompts`` and ``completions`` — lists of str
(a prompt is its record's prompt messages' contents joined by blank lines, e.g. an alpaca record's instruction
and input) or, when the prompt records are conversational (a ``messages`` list or a ``prompt`` list of {role,
content}), TRL's conversational form: each prompt a list of messages, each completion ``[{"role": "assistant",
"content": text}]`` — ``completion_ids`` (lists of token ids), ``trainer_state=None``, every field of the
prompt records as a list with one value per completion (TRL's dataset columns: ``answer``, ``solution``, …; a
record that lacks the field gives None) and the spec's options. A function without ``**kwargs`` gets only the
names it lists; one it lists that none of these supplies is one line.

**Time limit.** Each call must return within ``call_timeout`` seconds (a reserved option, default
`DEFAULT_TIMEOUT`; ``call_timeout: null`` for none); one that never returns stops the run with one line naming
it instead of hanging it (`call_with_timeout`: a SIGALRM timer in the main thread, else a helper thread).

**The answer** must be a sequence of real numbers, one per completion: a list or tuple of bool / int / float /
numpy or torch scalars, or a 1-D numpy array or torch tensor. Anything else — a string (``"1111"`` is not four
rewards), a dict (its keys are not scores), None (TRL's "not applicable"), a generator — is one line naming the
type and, for a bad element, its row.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import numbers
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import CONFIG_DIRS
from ..errors import TunelabError

DEFAULT_TIMEOUT = 60.0  # seconds per call; generous: a reward model or a test run may take a while
TRL_ARGS = ("prompts", "completions", "completion_ids", "trainer_state")
TUNELAB_SIG = "fn(batch, **options)"
TRL_SIGS = "fn(completions, **kwargs) or fn(prompts, completions, **kwargs)"


def _find(module: str) -> Path | None:
    """The folder (config folders, then the working directory) holding `module` as a .py file or a package."""
    rel = Path(*module.split("."))
    for folder in [*reversed(CONFIG_DIRS), Path.cwd()]:
        if (folder / rel.with_suffix(".py")).is_file() or (folder / rel / "__init__.py").is_file():
            return folder
    return None


def import_function(ref: str) -> Callable:
    """``"module:function"`` → the function (importing runs the module's top-level code)."""
    module, _, name = ref.partition(":")
    if not module or not name:
        raise TunelabError(f"reward '{ref}': a user function is named 'module:function'")
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that does not exist
        found = False
    if not found and (folder := _find(module)) is not None:
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
        importlib.invalidate_caches()
    try:
        fn = getattr(importlib.import_module(module), name)
    except AttributeError:
        raise TunelabError(f"reward '{ref}': module '{module}' has no attribute '{name}'") from None
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            where = ", ".join(str(d) for d in [*reversed(CONFIG_DIRS), Path.cwd()])
            raise TunelabError(f"reward '{ref}': cannot import '{module}': ModuleNotFoundError: no "
                               f"{module.replace('.', '/')}.py on the Python path, next to the config or in the "
                               f"working directory ({where})") from None
        raise TunelabError(f"reward '{ref}': cannot import '{module}': ModuleNotFoundError: {e}") from None
    except Exception as e:  # noqa: BLE001 — any failure while importing user code is the user's to fix
        raise TunelabError(f"reward '{ref}': cannot import '{module}': {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise TunelabError(f"reward '{ref}': '{name}' is not a function")
    return fn


def user_reward(ref: str, options: dict):
    """The `RewardFn` (``batch -> list[float]``) of a user function: imported, its signature checked now, each
    call time-limited and its answer checked (module docstring)."""
    options = dict(options)
    timeout = options.pop("call_timeout", DEFAULT_TIMEOUT)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise TunelabError(f"reward '{ref}': call_timeout must be a positive number of seconds or null, "
                           f"not {timeout!r}")
    fn = import_function(ref)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: call it the tunelab way and let the call tell
        return lambda batch: as_scores(call_with_timeout(fn, (batch,), options, timeout))
    sig = f"{ref.partition(':')[2]}{inspect.signature(fn)}"
    first = next(iter(params), None)
    if first in TRL_ARGS[:3] or "completions" in params and first != "batch":
        return _trl_style(ref, fn, params, options, timeout, sig)
    try:
        inspect.signature(fn).bind(None, **options)
    except TypeError:
        what = f"options {sorted(options)} do not fit its signature" if options else "its signature"
        raise TunelabError(f"reward '{ref}': {what} {sig}; expected tunelab's {TUNELAB_SIG} (batch: a RewardInputs)"
                           f" or TRL's {TRL_SIGS}") from None
    return lambda batch: as_scores(call_with_timeout(fn, (batch,), options, timeout))


def _trl_style(ref: str, fn, params, options: dict, timeout, sig: str):
    """A TRL-style reward: called with keywords (module docstring); its named parameters are checked per batch."""
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    positional_only = [n for n, p in params.items() if p.kind == p.POSITIONAL_ONLY]
    if positional_only:
        raise TunelabError(f"reward '{ref}': {sig}: TRL-style reward functions are called with keywords; "
                           f"'{positional_only[0]}' is positional-only")
    required = [n for n, p in params.items() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL,
                                                                                          p.VAR_KEYWORD)]

    def call(batch) -> list[float]:
        kwargs = {**trl_arguments(batch), **options}
        missing = [n for n in required if n not in kwargs]
        if missing:
            fields = sorted({k for r in batch.prompt_records for k in r.data})
            raise TunelabError(f"{sig}: parameter '{missing[0]}' is neither a TRL argument ({', '.join(TRL_ARGS)}), "
                               f"an option, nor a field of the prompt records (fields: {', '.join(fields)})")
        if not var_kw:
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        return as_scores(call_with_timeout(fn, (), kwargs, timeout))
    return call


def is_conversational(record) -> bool:
    """TRL's test: the prompt is a list of {role, content} messages (``messages`` or a list-valued ``prompt``)."""
    data = record.data
    return isinstance(data.get("messages"), list) or isinstance(data.get("prompt"), list)


def trl_arguments(batch) -> dict:
    """The keywords TRL's GRPOTrainer passes a reward function, from a `RewardInputs` batch."""
    chat = bool(batch.prompt_records) and all(is_conversational(r) for r in batch.prompt_records)
    messages = [batch.messages(i) for i in range(len(batch))]
    if chat:
        prompts = messages
        completions = [[{"role": "assistant", "content": c}] for c in batch.completions]
    else:
        prompts = ["\n\n".join(m["content"] for m in ms) for ms in messages]
        completions = list(batch.completions)
    fields = list(dict.fromkeys(k for r in batch.prompt_records for k in r.data if k not in TRL_ARGS))
    columns = {k: [r.data.get(k) for r in batch.prompt_records] for k in fields}
    return {**columns, "prompts": prompts, "completions": completions, "completion_ids": batch.completion_ids,
            "trainer_state": None}


class _Timeout(BaseException):
    """Raised by the alarm in the middle of a reward call (a BaseException: a user's ``except Exception`` does not
    swallow it)."""


def call_with_timeout(fn, args: tuple, kwargs: dict, timeout: float | None):
    """``fn(*args, **kwargs)``, or a `TunelabError` when it has not returned after `timeout` seconds.

    In the main thread (training is) the call runs right there under a SIGALRM timer, as TRL would run it — so a
    function that uses signals itself (e.g. math_verify's own timeouts) keeps working; should it reset the timer,
    it just runs without the limit. Elsewhere, or while another timer is running, it runs on a daemon thread with
    the caller's grad mode, abandoned if it does not return. Its own exception, if any, is raised unchanged."""
    if timeout is None:
        return fn(*args, **kwargs)
    if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0):
        return _call_with_alarm(fn, args, kwargs, timeout)
    return _call_on_thread(fn, args, kwargs, timeout)


def _too_slow(timeout: float) -> TunelabError:
    return TunelabError(f"did not return within {timeout:g} s (call_timeout); a function that needs longer: "
                        "raise call_timeout in its rl.rewards entry")


def _call_with_alarm(fn, args: tuple, kwargs: dict, timeout: float):
    def alarm(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        raise _too_slow(timeout) from None
    finally:
        signal.signal(signal.SIGALRM, previous)


def _call_on_thread(fn, args: tuple, kwargs: dict, timeout: float):
    box: dict = {}
    grad = torch.is_grad_enabled()

    def target():
        try:
            with torch.set_grad_enabled(grad):
                box["out"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 — handed to the calling thread as is
            box["error"] = e

    worker = threading.Thread(target=target, name=f"reward {getattr(fn, '__name__', fn)}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _too_slow(timeout)
    if "error" in box:
        raise box["error"]
    return box["out"]


def _real(x) -> float | None:
    if isinstance(x, torch.Tensor):
        return float(x) if x.dim() == 0 and not x.is_complex() else None
    if isinstance(x, (numbers.Real, np.bool_)):  # numpy's bool is not a numbers.Real
        return float(x)
    return None


def as_scores(out) -> list[float]:
    """A reward function's answer as floats, or a `TunelabError` naming its type (module docstring)."""
    kind = type(out).__name__
    if isinstance(out, (torch.Tensor, np.ndarray)):
        if out.ndim != 1:
            raise TunelabError(f"must return one number per completion; got a {out.ndim}-D {kind} of shape "
                               f"{tuple(out.shape)}")
        out = list(out)
    elif not isinstance(out, (list, tuple)):
        raise TunelabError(f"must return a list of numbers (one per completion), got {kind}"
                           + (f" {out!r:.40}" if isinstance(out, (str, bytes)) else ""))
    scores = []
    for i, x in enumerate(out):
        value = _real(x)
        if value is None:
            hint = " — TRL's 'not applicable' None is not taken: return a number" if x is None else ""
            raise TunelabError(f"must return a list of real numbers; row {i} is {type(x).__name__} ({x!r:.40})"
                               + hint)
        scores.append(value)
    return scores

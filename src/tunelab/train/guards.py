"""What stops a run cleanly instead of ruining it: divergence, non-finite weights, a full disk.

Divergence (`train.divergence`, checked by the loop every optimizer step, before the optimizer moves):

  1. every objective: a non-finite loss or global gradient norm stops the run;
  2. objectives whose loss is a mean token NLL (`nll_loss = True`: sft, rejection_sampling) also stop on
     *collapse*: the loss reached `collapse_fraction` · ln(vocab) — the NLL of a uniform prediction, which a
     model that learned anything stays far below — AND either it jumped above `collapse_jump` × the running
     mean of the previous steps' losses (exponential, decay 0.5: it follows a falling loss), or the gradient vanished (global norm <
     `min_grad_norm`) while that high. A freshly initialised model starts near ln(vocab) with its running
     mean there too and has a gradient, so neither fires on it; the first step (of a run or of a resume) is
     never judged, having nothing to compare with.

  Preference and RL losses are not NLLs: a DPO loss sits near ln 2, a GRPO loss can be 0 or negative and its
  gradient is legitimately 0 when every completion of a group has the same reward, so only rule 1 applies.

`check_finite` refuses to write a non-finite tensor into a checkpoint or an exported artifact. `disk_full`
turns a failed write (ENOSPC or EDQUOT, also inside safetensors' error text) into one `TunelabError` line
saying what was being written, where, and how much it needed.
"""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path

import torch

from ..errors import TunelabError

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, raised as an OSError or wrapped in safetensors' (Rust) error text."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return any(t in str(exc).lower() for t in _DISK_FULL_TEXT)


def free_bytes(path: Path) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n / 2**10:,.1f} KB" if n >= 2**10 else f"{n} bytes"


def disk_full(what: str, where: Path, needed: int | None = None, cleanup: str = "") -> TunelabError:
    """The one-line error for a write that ran out of space."""
    free = free_bytes(where)
    need = f" needs about {_size(needed)}" if needed else ""
    have = f", {_size(free)} free there" if free is not None else ""
    return TunelabError(f"disk full: writing {what} to {where}{need}{have}{'; ' + cleanup if cleanup else ''}")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def check_finite(named_tensors, what: str) -> None:
    """Raise a one-line TunelabError naming the first tensor with a NaN or an infinity."""
    for name, t in named_tensors:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TunelabError(f"refusing to write {what}: tensor '{name}' holds NaN or infinite values "
                               "(the training diverged; lower train.lr)")


class DivergenceGuard:
    """The rule of this module's docstring, fed one optimizer step at a time."""

    def __init__(self, cfg, vocab_size: int | None, nll_loss: bool):
        self.cfg, self.nll_loss = cfg, nll_loss
        self.uniform = math.log(vocab_size) if vocab_size and vocab_size > 1 else None
        self.mean: float | None = None  # exponential running mean of the losses so far

    def check(self, loss: float, grad_norm: float) -> str | None:
        """None when the step about to be taken is healthy, else the diagnosis."""
        cfg = self.cfg
        if not cfg.enabled:
            return None
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            return f"loss {loss:.4g}, gradient norm {grad_norm:.4g} (non-finite)"
        seen = self.mean
        self.mean = loss if seen is None else 0.5 * (seen + loss)
        if not (self.nll_loss and self.uniform and seen is not None and loss >= cfg.collapse_fraction * self.uniform):
            return None
        if loss > cfg.collapse_jump * seen:
            return (f"loss collapsed to {loss:.4g} (ln(vocab) = {self.uniform:.4g}: a uniform prediction) "
                    f"from a running mean of {seen:.4g}")
        if grad_norm < cfg.min_grad_norm:
            return (f"loss stuck at {loss:.4g} (ln(vocab) = {self.uniform:.4g}: a uniform prediction) "
                    f"with a vanished gradient (norm {grad_norm:.3g})")
        return None

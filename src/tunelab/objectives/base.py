"""The objective interface the training loop and the run orchestrator call.

    loss_sum, n, metrics = objective.loss(model, batch)

`loss_sum` is a *sum* over the micro-batch and `n` the number of units it sums over (loss tokens for SFT,
pairs for preference losses). The loop adds both over all accumulated micro-batches (and devices) and divides
once, so 4 micro-batches of 2 give exactly the gradient of one batch of 8 — not a mean of per-batch means,
which over-weights tokens of short batches.

Everything else that differs per objective is declared on the objective (`RunHooks`), so the orchestrator
(`train/run.py`) never branches on an objective's name. Adding an objective = one module with a class that
sets these, brings its ``Options`` (its config section) and ``from_config``, and implements `loss`, plus one
line in `registry.py`'s table (or `registry.register(cls)` from outside the package).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from ..errors import TunelabError


class Objective(Protocol):
    name: str

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]: ...


# Optional hooks, for objectives with state of their own (a moving DPO/KTO reference):
#   on_step(step)          called by the loop after optimizer step `step` (1-based), before any evaluation
#   state_dict()           tensors saved with every checkpoint (`objective.safetensors`), so resume is exact
#   load_state_dict(sd)    restores them when a run resumes from that checkpoint


class RunHooks:
    """What a run needs to know about an objective, with the defaults of a plain generative objective.

    Class attributes: ``data_kind`` (a `data.kinds` name: sft | pairs | unpaired | prompts — the last registered
    by `rl.prompts`), ``needs_reference`` (a frozen/adapter-off reference model is built for it), ``generator``
    (the trained model generates text, so learning/forgetting tasks run on it; a reward model does not),
    ``nll_loss`` (the loss is a mean token NLL, so a loss near ln(vocab) means collapse), ``Options`` (the
    objective's options class — a `config.Strict` model whose config section is named like the objective — or
    None). `from_config` builds the objective from its section. Class-level checks run before anything is
    written; instance hooks run during the run. Measures come from `scoring.HeldOutLoss` (SFT),
    `pairwise.PairMetrics` (preference objectives) or, for online objectives, the rollout source.
    """

    data_kind = "sft"
    needs_reference = False
    generator = True
    nll_loss = False  # the loss is a mean token NLL: the loop's collapse rule applies (train/guards.py)
    Options = None  # the options class; its section of the run config is `cfg.<name>`

    @classmethod
    def options(cls, cfg):
        """This objective's options: ``cfg.<name>``, or the defaults when `cfg` is None or has no such section
        (a `config.RunConfig` built without the registry's composed schema)."""
        if cls.Options is None:
            return None
        section = getattr(cfg, cls.name, None)
        return section if isinstance(section, cls.Options) else cls.Options()

    @classmethod
    def from_config(cls, cfg, reference=None):
        """The objective for run config `cfg`: reads its own section (`options`) and the shared ``train`` / ``rl``
        settings; `reference` only for objectives that need one (None when log-probs are precomputed)."""
        raise NotImplementedError(f"{cls.__name__} does not define from_config")

    @classmethod
    def wants_reference(cls, cfg) -> bool:
        """Whether this run builds a reference model (an objective may need one only for some settings)."""
        return cls.needs_reference

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse config combinations this objective cannot run (one `TunelabError` line)."""
        r = cfg.reference
        if cls.needs_reference and r.precompute and r.sync_every:
            raise TunelabError("reference.precompute cannot be combined with reference.sync_every "
                               "(a moving reference makes cached log-probs stale)")

    @classmethod
    def check_data(cls, stats: dict, cfg) -> None:
        """Look at the encoded data's statistics (warn about imbalance, …)."""

    @classmethod
    def prepare_model(cls, model, cfg=None) -> None:
        """Add what the objective trains beyond the method's parameters (a reward head, PPO's value model), after
        the method; `cfg` is the run's config (None in callers that have none: the defaults apply)."""

    def saving(self, model, out):
        """Context around writing adapter/ or model/: save the objective's own artifacts, keep them out of the
        plain causal-LM folder."""
        return contextlib.nullcontext()

    def extra_results(self, model, evals: list, pad_id: int) -> dict:
        """Fields for results.json beyond the measures before/after."""
        return {}

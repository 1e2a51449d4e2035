"""The reference policy π_ref of KL-regularised objectives (DPO family, KTO; later PPO) — one object for all.

Where it lives (``reference.mode``):

``adapter``  the policy itself with its adapter switched off (`adapters.base.disabled`): no second copy of the
             weights. This is the default for adapter methods, where the frozen base *is* the starting policy.
``copy``     a frozen deep copy of the policy taken at construction — the default for full finetuning —
             optionally on another device or in another dtype (e.g. a bf16 reference next to an fp32 policy).

The reference always runs without gradients and in eval mode (no dropout), so its log-probs are a pure function
of the batch: that is what makes cached log-probs equal to on-the-fly ones.

Moving reference (TR-DPO, Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
arXiv:2404.09656): every ``sync_every`` optimizer steps

    θ_ref ← α·θ + (1 − α)·θ_ref          (α = ``sync_alpha``; α = 1 is TR-DPO's hard update)

α defaults (``reference.sync_alpha: null``) to 0.6 for the DPO family (TR-DPO's soft update) and to 0.001 per step
for grpo, rloo and ppo — ReaLHF's EMA reference (η = 0.001): θ_ref then lags the policy by ~1/η = 1000 steps
(after k steps a weight of (1−η)^k stays on the start, 98 % after 20 steps). A larger η (e.g. 0.05: 64 % of the way
in 20 steps) is a weaker KL anchor, a different arm, not an EMA of the same kind.

The copy is of the *policy alone*: objects an objective hangs on the model beside it (PPO's value model,
``model.ppo_value``) are taken off while the copy is made, so the reference holds no value parameters and the
moving average never touches the value network.

For ``copy`` this updates every parameter of the copy. For ``adapter`` the reference keeps a *second set of
adapter weights* (initially the adapter at construction — zero-initialised LoRA, i.e. exactly the base model)
and the update is applied to that set; its log-probs are computed by swapping the set into the adapter modules
for the no-grad forward and swapping the policy's weights back. The swap is safe because objectives compute the
reference *before* the policy forward of a micro-batch, so no activation saved for backward sees the swap.
Low-rank adapters: the moving average acts on the factors (LoRA's A and B separately), not on the merged
update ΔW = s·B·A. With weights w_k (w_0 = (1−α)^n on the start, w_k = α(1−α)^{n−k} on the k-th synced
policy; Σ w_k = 1), B̄ = Σ w_k B_k, Ā = Σ w_k A_k, the reference's update differs from the average update by
exactly the weighted covariance of the factors' trajectory:

    Σ_k w_k B_k A_k − B̄ Ā = Σ_k w_k (B_k − B̄)(A_k − Ā),     ‖·‖_F ≤ Σ_k w_k ‖B_k − B̄‖_F ‖A_k − Ā‖_F

(`factor_ema_gap` computes both sides; tests/rl/test_ppo.py checks the identity and the bound). It is second
order in how far the factors move within the averaging window (~1/α syncs): small for a slow EMA, but not zero;
use ``reference.mode: copy`` with a full-finetuning run when the merged-space average matters. The loop calls
``on_step`` after every optimizer step (through the objective's `ReferenceHooks`), and the
moved weights go into every checkpoint (`state_dict`), so a resumed run continues with the reference it had.

Precomputed log-probs (`fill_cache`): one no-grad pass over the data before training, stored as safetensors in
the run directory with a fingerprint of the token ids, so a resumed run reuses it. Incompatible with a moving
reference (the cache would go stale at the first sync).
"""

from __future__ import annotations

import copy
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ..adapters.base import adapter_parameters, disabled, has_adapter
from ..errors import TunelabError
from .logprobs import sequence_logprobs
from .prompt_sharing import group_token_logprobs
from ..models.load import check_device
from ..models.modes import eval_mode
from .scoring import score_batches

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def view(batch: dict, prefix: str) -> dict:
    """The sub-batch stored under `prefix` (``kl_input_ids`` → ``input_ids``); the batch itself for ''."""
    if not prefix:
        return batch
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def _resolve_mode(mode: str, model, device: str | None, dtype: str | None) -> str:
    """The reference's mode for `model` (auto → adapter or copy); one line for options that cannot work."""
    if mode == "auto":
        mode = "adapter" if has_adapter(model) else "copy"
    if mode == "adapter" and not has_adapter(model):
        raise TunelabError("reference.mode=adapter needs an adapter method (method: lora); use copy")
    if mode == "adapter" and (device or dtype):
        raise TunelabError("reference.device/dtype apply to reference.mode=copy only (the adapter "
                           "reference shares the policy's weights)")
    if device is not None:
        check_device(device, "reference.device")
    return mode


def check_reference(options, model) -> None:
    """Validate ``reference:`` options against the wrapped policy before the run writes anything."""
    _resolve_mode(options.mode, model, options.device, options.dtype)


class Reference:
    def __init__(self, model, mode: str = "auto", device: str | None = None, dtype: str | None = None,
                 sync_every: int | None = None, sync_alpha: float = 0.6, chunk_size: int = 1024):
        mode = _resolve_mode(mode, model, device, dtype)
        self.mode, self.policy, self.chunk_size = mode, model, chunk_size
        self.sync_every, self.sync_alpha = sync_every, sync_alpha
        self.model = None
        self._ref_adapter: dict[str, torch.Tensor] | None = None
        if mode == "copy":
            with policy_alone(model):  # no value model in the reference (nor in its EMA)
                self.model = copy.deepcopy(model)
            for p in self.model.parameters():
                p.requires_grad_(False)
            if device or dtype:
                self.model.to(device=device, dtype=_DTYPES[dtype] if dtype else None)
        elif sync_every:
            # The moving adapter reference: a second set of adapter weights, starting at the current adapter.
            self._ref_adapter = {k: p.detach().clone() for k, p in adapter_parameters(model).items()}

    # -------------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def token_logprobs(self, batch: dict, temperature: float = 1.0, share_prompts: bool = False) -> torch.Tensor:
        """log π_ref of every target token, [B, T] fp32 on the batch's device (0 off the loss mask);
        `temperature` as in `logprobs.token_logprobs` (online RL's KL at the sampling temperature);
        `share_prompts`: rows of one ``prompt_index`` scored with the prompt encoded once when exact
        (`prompt_sharing.group_token_logprobs`; online RL's completion groups)."""
        if self.mode == "copy":
            if self.model is None:
                raise RuntimeError("the reference copy was released after precomputing its log-probs")
            dev = next(self.model.parameters()).device
            moved = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
            with eval_mode(self.model):
                return group_token_logprobs(self.model, moved, self.chunk_size, temperature=temperature,
                                            share=share_prompts).to(batch["input_ids"].device)
        with eval_mode(self.policy), self._adapter_weights(), disabled_unless(self.policy, self._ref_adapter):
            return group_token_logprobs(self.policy, batch, self.chunk_size, temperature=temperature,
                                        share=share_prompts)

    def logps(self, batch: dict, prefix: str = "") -> torch.Tensor:
        """Σ_t log π_ref(y_t | x, y_<t) over each row's response tokens → [B] fp32."""
        sub = view(batch, prefix)
        return sequence_logprobs(self.token_logprobs(sub), sub)[0]

    @contextmanager
    def _adapter_weights(self):
        """With a moving adapter reference: the reference's adapter weights in place of the policy's."""
        if self._ref_adapter is None:
            yield
            return
        params = adapter_parameters(self.policy)
        saved = {k: p.detach().clone() for k, p in params.items()}
        try:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(self._ref_adapter[k])
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])

    # ---------------------------------------------------------------------------------------------- update
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a moving reference has moved (empty for a fixed reference: nothing to save)."""
        if not self.sync_every:
            return {}
        if self.mode == "copy":
            return {f"copy.{n}": p.detach() for n, p in self.model.named_parameters()}
        return {f"adapter.{k}": t for k, t in self._ref_adapter.items()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        mine = self.state_dict()
        if set(sd) != set(mine):
            raise TunelabError("the checkpoint's reference weights do not match this run's reference "
                               f"(mode={self.mode}, sync_every={self.sync_every}); start a new run or fix the config")
        for k, t in sd.items():
            mine[k].copy_(t)

    def on_step(self, step: int) -> bool:
        """Call after optimizer step `step` (1-based); syncs when due. Returns whether it synced."""
        if not self.sync_every or step % self.sync_every:
            return False
        self.sync(self.sync_alpha)
        return True

    @torch.no_grad()
    def sync(self, alpha: float = 1.0) -> None:
        """θ_ref ← α·θ + (1 − α)·θ_ref (a hard copy for α = 1)."""
        if self.mode == "copy":
            src = dict(self.policy.named_parameters())
            for name, p in self.model.named_parameters():
                p.lerp_(src[name].detach().to(p.device, p.dtype), alpha)
        elif self._ref_adapter is not None:
            for k, p in adapter_parameters(self.policy).items():
                self._ref_adapter[k].lerp_(p.detach(), alpha)
        else:
            raise RuntimeError("adapter reference without sync_every has no weights to move")

    def release(self) -> None:
        """Drop the copy (after precomputing): its memory is the reason to precompute."""
        self.model = None


EXTRAS = ("ppo_value",)  # modules an objective hangs on the policy (value.ATTR; value.py is not imported here:
# value → reward → pairwise → reference would be an import cycle)


@contextmanager
def policy_alone(model):
    """`model` without the modules of `EXTRAS` for the block (they are put back after)."""
    taken = {name: getattr(model, name) for name in EXTRAS if getattr(model, name, None) is not None}
    for name in taken:
        delattr(model, name)
    try:
        yield model
    finally:
        for name, module in taken.items():
            setattr(model, name, module)


class ReferenceHooks:
    """The loop's objective hooks (see `objectives.base`) for objectives holding a `self.reference`."""

    reference: Reference | None

    def on_step(self, step: int) -> None:
        if self.reference is not None:
            self.reference.on_step(step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.reference.state_dict() if self.reference is not None else {}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if self.reference is not None:
            self.reference.load_state_dict(sd)
        elif sd:
            raise TunelabError("the checkpoint holds reference weights but this run has no reference model")


@contextmanager
def disabled_unless(model, ref_adapter):
    """The base model (adapter off) — unless a moving adapter reference has been swapped in, which must run."""
    if ref_adapter is not None:
        yield model
    else:
        with disabled(model):
            yield model


# ------------------------------------------------------------------------------------------------- caching
def _pair_of(ex) -> tuple:
    return (ex.chosen, ex.rejected) if hasattr(ex, "chosen") else (ex.example, ex.kl)


def fingerprint(sets: dict[str, list], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for name in sorted(sets):
        h.update(name.encode())
        for ex in sets[name]:
            for enc in _pair_of(ex):
                h.update(repr((enc.input_ids, enc.loss_mask)).encode())
    return h.hexdigest()[:32]


def compute_pairs(reference: Reference, examples: list, pad_id: int, batch_size: int = 8,
                  device=None) -> torch.Tensor:
    """[N, 2] reference log-probs of each example's two sequences (chosen/rejected, or completion/KL partner).

    Each batch stacks the chunk's first sequences, then its second ones (one forward, like `collate_pairs`).
    Batches go to `device` (default: stay on the CPU; a ``copy`` reference moves them to its own device)."""
    from ..data.collate import collate

    def both(chunk: list) -> dict:
        return collate([_pair_of(e)[0] for e in chunk] + [_pair_of(e)[1] for e in chunk], pad_id)

    def logps(_policy, batch: dict) -> torch.Tensor:
        lp = reference.logps(batch).cpu()
        n = lp.shape[0] // 2
        return torch.stack([lp[:n], lp[n:]], dim=1)

    rows = score_batches(reference.policy, examples, both, logps, batch_size=batch_size,
                         device=torch.device("cpu") if device is None else device)
    return torch.cat(rows) if rows else torch.zeros(0, 2)


def fill_cache(path: Path, reference: Reference, sets: dict[str, list], pad_id: int, batch_size: int = 8,
               tag: str = "", device=None) -> bool:
    """Set `ex.ref` on every example of every set, from `path` when its fingerprint matches, else computed
    and written there (atomically). Returns True when it was read from disk."""
    from safetensors.torch import load_file, safe_open, save_file

    fp = fingerprint(sets, tag)
    tensors = None
    if path.exists():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fp:
                tensors = load_file(str(path))
    loaded = tensors is not None
    if not loaded:
        tensors = {name: compute_pairs(reference, exs, pad_id, batch_size, device) for name, exs in sets.items()}
        tmp = path.with_suffix(f".tmp{os.getpid()}")  # data-parallel ranks write the same file: own temp each
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fingerprint": fp})
        tmp.replace(path)
    for name, exs in sets.items():
        for ex, (a, b) in zip(exs, tensors[name].tolist()):
            ex.ref = (a, b)
    return loaded


EMA_OBJECTIVES = ("grpo", "rloo", "ppo")  # their moving reference is an EMA: α = 0.001 per step by default


def default_sync_alpha(cfg) -> float:
    """``reference.sync_alpha``, or its objective's default when null (see the module docstring)."""
    if cfg.reference.sync_alpha is not None:
        return cfg.reference.sync_alpha
    return 0.001 if cfg.objective in EMA_OBJECTIVES else 0.6


def factor_ema_gap(factors: list[tuple[torch.Tensor, torch.Tensor]], alpha: float) -> tuple[float, float]:
    """(‖Σ w_k B_k A_k − B̄Ā‖_F, Σ_k w_k ‖B_k − B̄‖_F ‖A_k − Ā‖_F) for a trajectory [(B_0, A_0), …, (B_n, A_n)]
    of one LoRA module's factors synced with α after each step (k = 0 is the reference's start): the gap between
    averaging the factors and averaging the merged update, and its bound (module docstring)."""
    n = len(factors) - 1
    w = [(1 - alpha) ** n] + [alpha * (1 - alpha) ** (n - k) for k in range(1, n + 1)]
    B_bar = sum(wk * B for wk, (B, _) in zip(w, factors))
    A_bar = sum(wk * A for wk, (_, A) in zip(w, factors))
    merged = sum(wk * (B @ A) for wk, (B, A) in zip(w, factors))
    gap = float(torch.linalg.norm(merged - B_bar @ A_bar))
    bound = sum(wk * float(torch.linalg.norm(B - B_bar)) * float(torch.linalg.norm(A - A_bar))
                for wk, (B, A) in zip(w, factors))
    return gap, bound


def build_reference(cfg, model, sets: dict[str, list], pad_id: int, run_dir: Path) -> Reference | None:
    """The run's Reference when its objective needs one, else None. With ``reference.precompute`` the
    log-probs of every example in `sets` are cached (``reference_logps.safetensors`` in `run_dir`, reused on
    resume), stored on the examples (`ex.ref`), and the reference itself is released — so None again."""
    import time

    from ..console import console, phase, plural
    from .registry import objective_class

    if not objective_class(cfg.objective).wants_reference(cfg):
        return None
    r = cfg.reference
    ref = Reference(model, r.mode, r.device, r.dtype, r.sync_every, default_sync_alpha(cfg),
                    cfg.train.loss_chunk_size)
    if not r.precompute:
        return ref
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    with phase(f"reference log-probs of {plural(sum(len(v) for v in sets.values()), 'example')}"):
        loaded = fill_cache(run_dir / "reference_logps.safetensors", ref, {k: v for k, v in sets.items() if v},
                            pad_id, batch_size=max(cfg.train.batch_size, 4), tag=f"{cfg.model.name}|{ref.mode}",
                            device=device)
    console.print(f"reference log-probs {'loaded from cache' if loaded else 'precomputed'} "
                  f"({time.perf_counter() - t0:.0f}s)")
    ref.release()
    return None

"""Data parallelism with PyTorch's own engine: `torchrun` launches the ranks, DDP or FSDP2 wraps the model.

    torchrun --nproc-per-node 2 -m tunelab train CONFIG     (or: tunelab train CONFIG --nproc 2)

What each rank does:

* it reads its own slice of every global micro-batch (`data.batches.shuffled_batches`: the global batch of
  ``world · train.batch_size`` rows is cut into ``world`` contiguous slices) — online RL samples its share of
  each round's prompts, whole groups per rank (`rl.rollout`);
* it back-propagates its *unnormalised* loss sum; DDP and FSDP2 average gradients over ranks, and the loop
  divides them by ``Σn / world`` where Σn is the loss-unit count all-reduced over ranks and micro-batches — so
  N ranks × micro-batch b give the gradient of one process with batch N·b (the loop's accumulation invariant);
* evaluation, sampling and the final measures run on every rank on the full weights (replicated: no
  collective inside, so ranks never wait on each other there); only rank 0 prints, writes metrics, samples,
  checkpoint metadata and the final artifacts.

``parallel`` (config):

``ddp``   `DistributedDataParallel`: every rank holds the whole model; gradients are all-reduced.
``fsdp``  FSDP2 (`fully_shard`): each decoder block is one unit, the rest of the model (embeddings, final norm,
          lm_head) the root unit; frozen base weights are sharded too, the adapter stays trainable. On CUDA the
          loop's bf16 autocast computes, gradients are reduced in fp32 (`MixedPrecisionPolicy(reduce_dtype)`).
``auto``  ``fsdp`` when the model's weights take more than a quarter of one accelerator's memory (they would
          not leave room for activations if replicated) or, on CPU, more than 2 GB; else ``ddp`` — replication is
          simpler and faster whenever it fits.

Why a `Host` module: the objectives run the decoder body and the lm_head themselves (`objectives.logprobs`), not
the model's ``forward``. DDP and FSDP2 act in the *wrapper's* forward (DDP prepares its gradient reduction,
FSDP2 all-gathers the root unit's weights), so the loss function itself runs as the forward of a small root
module: ``engine.forward(objective.loss, batch)``. Everything else that runs the model (evaluation, sampling,
reference log-probs, saving) does so inside `Engine.gathered()`, which all-gathers every FSDP unit once and
keeps it gathered, so those forwards need no collective.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..console import console
from ..errors import TunelabError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (any world size: FSDP2 at one rank is a useful check) or by another launcher that
    sets the env:// rendezvous variables for more than one rank."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun describes (no-op for a single process); only rank 0 prints afterwards."""
    if not launched() or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # a long timeout: rank 0 may write artifacts while the others wait at a barrier
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    if dist.get_rank() != 0:
        console.quiet = True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def main_says(value: int) -> int:
    """Rank 0's `value` on every rank (a plain return without a process group)."""
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, 0)
    return int(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _error_file() -> str:
    """A file per torchrun launch (and node) where the first rank that fails with a user error says so
    (`tunelab train --nproc` names it, and removes it afterwards)."""
    if os.environ.get("TUNELAB_ERROR_FILE"):
        return os.environ["TUNELAB_ERROR_FILE"]
    run = "-".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
                                                   "TORCHELASTIC_RESTART_COUNT"))
    return os.path.join(tempfile.gettempdir(), f"tunelab-error-{hashlib.sha256(run.encode()).hexdigest()[:16]}")


def failed_elsewhere() -> bool:
    """Has another rank of this launch already stopped with a user error? Then this rank's own failure (a
    collective whose peer went away) is a consequence, not news: it leaves quietly."""
    return launched() and os.path.exists(_error_file())


def report_error(message: str) -> bool:
    """Whether this rank should print a user error: the first failing rank on a node does, the others stay
    silent (a config or data error is raised by every rank at once; printing it N times helps nobody)."""
    if world_size() == 1 and not launched():
        return True
    try:
        fd = os.open(_error_file(), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(message + "\n")
    return True


def choose_parallel(setting: str, model: nn.Module) -> str:
    """``auto`` → ``ddp`` or ``fsdp`` (see the module docstring)."""
    if setting != "auto":
        return setting
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 4
    else:
        budget = 2 * 1024 ** 3
    return "fsdp" if weights > budget else "ddp"


def plan(setting: str, model: nn.Module) -> str:
    """What this process will run: ``single`` without a process group (or ``auto`` at one rank), else ddp/fsdp."""
    if not (dist.is_available() and dist.is_initialized()) or (world_size() == 1 and setting == "auto"):
        return "single"
    return choose_parallel(setting, model)


class Host(nn.Module):
    """The root module DDP/FSDP2 wrap: its forward runs ``fn(model, *args)`` (an objective's loss)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the FSDP2 units): the largest ModuleList of the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise TunelabError("parallel=fsdp: found no list of decoder blocks to shard in this model")
    return max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))


class Engine:
    """How the loop runs a step on this process: plainly (one process), under DDP, or under FSDP2.

    The model keeps its identity (FSDP2 shards it in place; DDP wraps a `Host` around it), so references,
    evaluation and artifacts keep using the same object."""

    def __init__(self, model: nn.Module, parallel: str = "auto"):
        self.model, self.world, self.rank = model, world_size(), rank()
        self.kind = plan(parallel, model)
        self.wrapped = None
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = next(model.parameters()).device
            # a mixture of experts leaves the experts no token was routed to without a gradient in a step
            moe = any(getattr(getattr(model, "config", None), k, None) for k in ("num_local_experts", "num_experts"))
            self.wrapped = DDP(Host(model), device_ids=[dev.index] if dev.type == "cuda" else None,
                               find_unused_parameters=bool(moe))
        elif self.kind == "fsdp":
            self.wrapped = self._shard(model)

    def _shard(self, model: nn.Module):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dev = next(model.parameters()).device
        # Mixed precision on CUDA is the loop's bf16 autocast over fp32 weights, with gradients reduced in fp32.
        # A bf16 `param_dtype` would halve the all-gather traffic, but then the gathered weights that evaluation
        # and the exported adapter read would be bf16 instead of the trained fp32 values.
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32) if dev.type == "cuda" else MixedPrecisionPolicy()
        for block in decoder_blocks(model):
            fully_shard(block, mp_policy=mp)
        # the root must not cast the batch (old log-probs and advantages stay fp32); the blocks cast their inputs
        root_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                       cast_forward_inputs=False)
        host = fully_shard(Host(model), mp_policy=root_mp)
        with torch.no_grad():  # one forward through the root first: FSDP2 then knows which unit is the root
            host(lambda m: None)
        return host

    # ------------------------------------------------------------------------------------------ training
    @property
    def distributed(self) -> bool:
        return self.kind != "single"

    def forward(self, fn, *args):
        """``fn(model, *args)`` as the wrapper's forward (DDP/FSDP2 hooks active); a plain call otherwise."""
        return fn(self.model, *args) if self.wrapped is None else self.wrapped(fn, *args)

    def sync(self, last: bool):
        """Gradient reduction on the last micro-batch of a step only (accumulate locally before it)."""
        if self.kind == "ddp" and not last:
            return self.wrapped.no_sync()
        if self.kind == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    @property
    def grad_world(self) -> int:
        """DDP and FSDP2 average gradients over ranks: the loop divides by Σn / world instead of Σn."""
        return self.world

    def all_sum(self, *values: float) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def max_int(self, value: int) -> int:
        """The largest `value` over ranks (e.g. "did any rank fail, and which": rank + 1 or 0) — every rank
        gets the same answer, so every rank takes the same branch afterwards."""
        if not self.distributed:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def from_main(self, value: int) -> int:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
        dist.broadcast(t, 0)
        return int(t.item())

    def mean_metrics(self, metrics: dict) -> dict:
        """Per-rank metrics averaged over ranks (every rank must report the same keys, in any order)."""
        if not self.distributed or not metrics:
            return metrics
        keys = sorted(metrics)
        return dict(zip(keys, [v / self.world for v in self.all_sum(*(float(metrics[k]) for k in keys))]))

    def clip(self, params: list, max_norm: float | None) -> float:
        """Clip the global gradient norm (all ranks' shards together); returns the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # ---------------------------------------------------------------------------------- everything else
    @contextlib.contextmanager
    def gathered(self):
        """Every FSDP2 unit all-gathered and kept so: forwards inside (evaluation, sampling, reference
        log-probs) need no collective and see plain tensors. Every rank must enter it. No-op without FSDP2."""
        if self.kind != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.wrapped.modules() if isinstance(m, FSDPModule)]
        for u in units:
            u.set_reshard_after_forward(False)
            u.unshard()
        try:
            yield
        finally:
            for u in units:
                u.reshard()
                u.set_reshard_after_forward(u is not self.wrapped)

    def full_state_dict(self) -> dict | None:
        """Under FSDP2, every tensor of the model in full, on rank 0's CPU (collective; other ranks get an
        empty dict) — what `save_pretrained` needs, since a sharded module's own state dict holds DTensors.
        None otherwise: the model's own state dict is already whole."""
        if self.kind != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_supported(cfg, parallel: str) -> None:
    """Refuse what does not compose with sharding yet (`parallel`: the chosen kind), naming the way out."""
    if parallel == "fsdp" and cfg.reference.sync_every:
        raise TunelabError("reference.sync_every (a moving reference) is not supported with parallel=fsdp; "
                           "use parallel=ddp")

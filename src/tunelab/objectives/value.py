"""PPO's value model V_φ(s_t): a scalar head on hidden states, per token, in one of two places (``ppo.value_model``).

``adapter``  (default for adapter methods) the *same frozen base* with its own set of adapter weights: a copy of
             the policy's adapter tensors at the start (LoRA: B = 0, i.e. the base's hidden states), trained by
             the value loss only. Its forward swaps those tensors in with `torch.func.functional_call`, so the
             policy's adapter never sees a value gradient and no second base model is held in memory: the
             cheap choice on one device (one more forward of the body per micro-batch, one more adapter).
``copy``     (default for full finetuning) a trainable deep copy of the policy's transformer body: a separate
             value network as in InstructGPT (Ouyang et al. 2022), at the memory cost of a second model (its
             weights, gradients and optimizer state — with AdamW about 4× the body's size in fp32).

The head is ``nn.Linear(H, 1)`` in fp32, zero-initialised, so V = 0 before training. With ``ppo.value_init``
naming a finished tunelab ``objective: reward`` run, the value model starts as that reward model, InstructGPT's
initialisation (Ouyang et al. 2022, §3.5): the head is the reward head; ``copy`` takes the reward model's trained
body (trained on as it was: its adapter, or all of it), ``adapter`` its adapter tensors, which needs the reward run
to have the same adapter layout (method, target modules, rank) over the same base weights (checked on the
embeddings and the first adapted layer's base weight; otherwise a one-line error says to use ``copy``).

Alignment: token t is predicted from position t−1 (`logprobs.token_logprobs`), so the value of the state in
which token t is chosen, V(x, y_<t), is the head on the hidden state at t−1; `token_values` returns it at t,
aligned with the log-probs, 0 off the loss mask. The module hangs on the model as ``model.ppo_value``, so the
loop's optimizer, gradient clipping and checkpoints (`trainable.safetensors`) include it with no change; it is
taken off while the adapter/model folder is written (`detached`) and saved beside it as ``value_model.safetensors``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..adapters.base import adapter_modules, adapter_parameters, batch_context, has_adapter
from ..errors import TunelabError
from .logprobs import decoder, target_mask

ATTR = "ppo_value"
FILE = "value_model.safetensors"
MODES = ("adapter", "copy")


def _body_prefix(model) -> str:
    body = decoder(model)
    return next(name for name, m in model.named_modules() if m is body)


class ValueModel(nn.Module):
    """The value network beside a policy (see the module docstring). Not an adapter module: the policy's
    adapter functions (`adapter_parameters`, merge, export) never see it."""

    def __init__(self, model, mode: str = "auto"):
        super().__init__()
        if mode == "auto":
            mode = "adapter" if has_adapter(model) else "copy"
        if mode not in MODES:
            raise TunelabError(f"ppo.value_model={mode!r}; choose auto, {', '.join(MODES)}")
        if mode == "adapter" and not has_adapter(model):
            raise TunelabError("ppo.value_model=adapter needs an adapter method (method: lora, …); use copy")
        self.mode = mode
        hidden = model.config.get_text_config().hidden_size
        device = next(model.parameters()).device
        self.head = nn.Linear(hidden, 1, dtype=torch.float32, device=device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.names: dict[str, str] = {}  # body-relative parameter name → key in self.adapter
        if mode == "adapter":
            prefix = _body_prefix(model) + "."
            self.adapter = nn.ParameterDict()
            for full, p in adapter_parameters(model).items():
                if full.startswith(prefix) and p.requires_grad:  # a trained lm_head is not part of V's body
                    key = full[len(prefix):].replace(".", "__")
                    self.names[full[len(prefix):]] = key
                    self.adapter[key] = nn.Parameter(p.detach().clone())
        else:
            self.body = copy.deepcopy(decoder(model))

    def hidden(self, model, batch: dict) -> torch.Tensor:
        """Last hidden states [B, T, H] of the value network's body on `batch`."""
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch.get("position_ids"), use_cache=False)
        with batch_context(model, batch):
            if self.mode == "copy":
                return self.body(**kwargs).last_hidden_state
            params = {name: self.adapter[key] for name, key in self.names.items()}
            return functional_call(decoder(model), params, args=(), kwargs=kwargs, strict=False).last_hidden_state


def add_value_model(model, mode: str = "auto", init: str | None = None) -> ValueModel:
    vm = ValueModel(model, mode)
    if init:
        load_head_from_reward_run(vm, init, model)
    setattr(model, ATTR, vm)
    return vm


def value_model(model) -> ValueModel:
    vm = getattr(model, ATTR, None)
    if vm is None:
        raise TunelabError("objective ppo: the model has no value model (prepare_model was not called)")
    return vm


def token_values(model, batch: dict) -> torch.Tensor:
    """V(x, y_<t) at every target token t, [B, T] fp32 (0 off the loss mask; see the module docstring)."""
    vm = value_model(model)
    h = vm.hidden(model, batch)
    mask = target_mask(batch["loss_mask"])
    pos = mask.nonzero(as_tuple=True)
    v = vm.head(h[pos[0], pos[1] - 1].float()).squeeze(-1)
    return torch.zeros(mask.shape, dtype=torch.float32, device=h.device).index_put(pos, v)


def load_head_from_reward_run(vm: ValueModel, run_dir: str, model=None) -> None:
    """Start `vm` as the reward model of the `objective: reward` run in `run_dir` (see the module docstring):
    its head always, its body (``copy``) or its adapter tensors (``adapter``) when `model`, the policy, is given."""
    from .reward import HEAD, load_reward_model

    path = Path(run_dir) / "reward_head.safetensors"
    if not path.exists():
        raise TunelabError(f"ppo.value_init: {path} not found (give a finished `objective: reward` run folder)")
    device = vm.head.weight.device
    rm = load_reward_model(run_dir, "cuda" if device.type == "cuda" else "cpu").model
    w = getattr(rm, HEAD).weight
    if w.shape != vm.head.weight.shape:
        raise TunelabError(f"ppo.value_init: the reward head has shape {tuple(w.shape)}, this model's value head "
                           f"{tuple(vm.head.weight.shape)} (a different hidden size)")
    with torch.no_grad():
        vm.head.weight.copy_(w.float())
        if model is None:
            return
        if vm.mode == "copy":
            _body_from(vm, rm)
        else:
            _adapter_from(vm, model, rm, run_dir)


def _body_from(vm: ValueModel, rm) -> None:
    # The reward model's body replaces the copy, trained as the copy would be: its adapter (a LoRA reward model)
    # or all of it (a fully finetuned one).
    body = decoder(rm)
    if body.config.hidden_size != vm.head.in_features:
        raise TunelabError("ppo.value_init: the reward model's hidden size differs from the policy's")
    trainable = set(map(id, adapter_parameters(rm).values())) if has_adapter(rm) else None
    for p in body.parameters():
        p.requires_grad_(trainable is None or id(p) in trainable)
    vm.body = body


def _adapter_from(vm: ValueModel, model, rm, run_dir: str) -> None:
    hint = f"ppo.value_init: {run_dir}"
    if not has_adapter(rm):
        raise TunelabError(f"{hint} is a full-finetuning reward model; its body cannot be an adapter on this "
                           "policy's base (use ppo.value_model: copy)")
    prefix = _body_prefix(rm) + "."
    theirs = {full[len(prefix):]: p for full, p in adapter_parameters(rm).items() if full.startswith(prefix)}
    if set(theirs) != set(vm.names) or any(theirs[n].shape != vm.adapter[k].shape for n, k in vm.names.items()):
        raise TunelabError(f"{hint} has a different adapter layout (method, target modules or rank) than this "
                           "run's; use ppo.value_model: copy")
    first = next(name for name, _ in adapter_modules(rm) if name.startswith(prefix))  # e.g. …layers.0.…q_proj
    probes = [(model.get_input_embeddings().weight, rm.get_input_embeddings().weight),
              (model.get_submodule(first).weight, rm.get_submodule(first).weight)]
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in probes)
    if not same:
        raise TunelabError(f"{hint} was trained over different base weights than this policy; its adapter would "
                           "not mean the same thing here (use ppo.value_model: copy)")
    for name, key in vm.names.items():
        vm.adapter[key].copy_(theirs[name].to(vm.adapter[key].dtype))


@contextmanager
def detached(model, out: Path | None = None):
    """Take the value model off `model` for the block (and save it to ``out/value_model.safetensors`` first)."""
    vm = getattr(model, ATTR, None)
    if vm is not None:
        if out is not None:
            from safetensors.torch import save_file

            save_file({k: t.detach().float().cpu().contiguous() for k, t in vm.state_dict().items()},
                      str(Path(out) / FILE), metadata={"mode": vm.mode})
        delattr(model, ATTR)
    try:
        yield vm
    finally:
        if vm is not None:
            setattr(model, ATTR, vm)

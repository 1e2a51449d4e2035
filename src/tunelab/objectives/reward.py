"""Reward model: a Bradley–Terry scalar head on the language model (Christiano et al. 2017; Ouyang et al. 2022).

    r_φ(x, y) = w · h_last(x, y)          h_last: the final hidden state at the sequence's last token
    L = −log σ(r⁺ − r⁻ − m) + c·(r⁺ + r⁻)²

m is the pair's margin (data field ``margin``, default 0; Llama 2 §3.2.2 uses graded margins) and c =
``pref.center_rewards`` pulls rewards towards zero mean (Eisenstein et al. 2023, arXiv:2312.09244; TRL's
``center_rewards_coefficient``, default off; 0.01 is the usual value). The head is ``nn.Linear(H, 1,
bias=False)`` in fp32, like the ``score`` head of ``AutoModelForSequenceClassification`` that TRL's
`RewardTrainer` uses. It trains with the adapter (LoRA) or with the whole model (full finetuning).

Saved next to the run's ``adapter/`` or ``model/`` folder as ``reward_head.safetensors`` (+ ``reward_head.json``)
so later stages (PPO, evaluation) rebuild the scorer with `load_reward_model(run_dir)`; `pairwise_accuracy` is
the evaluation (share of held-out pairs where r⁺ > r⁻).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .logprobs import forward_hidden

HEAD = "reward_head"
HEAD_FILE = "reward_head.safetensors"


def add_reward_head(model) -> nn.Linear:
    hidden = model.config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1, bias=False, dtype=torch.float32, device=next(model.parameters()).device)
    nn.init.normal_(head.weight, std=getattr(model.config, "initializer_range", 0.02))
    setattr(model, HEAD, head)
    return head


def rewards(model, batch: dict) -> torch.Tensor:
    """r(x, y) for every row [B] (fp32): the head on the hidden state of each row's last real token."""
    hidden, _ = forward_hidden(model, batch)
    last = batch["attention_mask"].sum(-1) - 1  # right padding, one sequence per row
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return getattr(model, HEAD)(h.float()).squeeze(-1)


class RewardModelObjective:
    name = "reward"
    needs_reference = False

    def __init__(self, center_rewards: float = 0.0):
        self.center = center_rewards

    def loss(self, model, batch: dict):
        P = batch["input_ids"].shape[0] // 2
        r = rewards(model, batch)
        rc, rr = r[:P], r[P:]
        margin = batch.get("margin")
        margin = torch.zeros_like(rc) if margin is None else margin.to(rc)
        losses = -F.logsigmoid(rc - rr - margin)
        if self.center:
            losses = losses + self.center * (rc + rr) ** 2
        d = (rc - rr).detach()
        m = {"reward_chosen": float(rc.detach().mean()), "reward_rejected": float(rr.detach().mean()),
             "reward_margin": float(d.mean()), "pref_accuracy": float((d > 0).float().mean())}
        return losses.sum(), torch.tensor(P, device=losses.device), m


@contextmanager
def head_detached(model):
    """Take the head off the model for the duration (so `save_pretrained` writes a plain causal LM)."""
    head = getattr(model, HEAD, None)
    if head is not None:
        delattr(model, HEAD)
    try:
        yield head
    finally:
        if head is not None:
            setattr(model, HEAD, head)


def save_reward_head(model, out: Path) -> Path:
    from safetensors.torch import save_file

    head = getattr(model, HEAD)
    save_file({"weight": head.weight.detach().float().cpu().contiguous()}, str(out / HEAD_FILE))
    (out / "reward_head.json").write_text(json.dumps({"hidden_size": head.in_features, "pooling": "last_token",
                                                      "loss": "bradley_terry"}))
    return out / HEAD_FILE


@torch.no_grad()
def pairwise_accuracy(model, examples: list, pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Share of pairs the reward model orders correctly (r⁺ > r⁻), and the mean margin r⁺ − r⁻."""
    from ..data.preference import collate_pairs

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    diffs = []
    for k in range(0, len(examples), batch_size):
        chunk = examples[k:k + batch_size]
        batch = {key: v.to(device) for key, v in collate_pairs(chunk, pad_id).items()}
        r = rewards(model, batch)
        diffs.append((r[:len(chunk)] - r[len(chunk):]).cpu())
    model.train(was)
    d = torch.cat(diffs) if diffs else torch.zeros(0)
    return {"accuracy": float((d > 0).float().mean()) if len(d) else float("nan"),
            "margin": float(d.mean()) if len(d) else float("nan"), "n_pairs": len(d)}


class RewardModel:
    """A trained reward model: `score(prompt_messages, response)` → r(x, y)."""

    def __init__(self, model, tokenizer, template):
        self.model, self.tokenizer, self.template = model, tokenizer, template

    @torch.no_grad()
    def score(self, prompt: list[dict] | str, response: str) -> float:
        from ..data.collate import collate
        from ..data.preference import _encode

        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        enc = _encode(self.tokenizer, self.template, prompt, {"role": "assistant", "content": response}, "", None)
        batch = collate([enc], self.tokenizer.pad_token_id)
        dev = next(self.model.parameters()).device
        with torch.no_grad():
            return float(rewards(self.model.eval(), {k: v.to(dev) for k, v in batch.items()})[0])

    def accuracy(self, source: str, max_length: int | None = None, limit: int | None = None) -> dict[str, float]:
        """`pairwise_accuracy` on a preference file or dataset."""
        from ..data.preference import encode_pairs, to_pair
        from ..data.sources import load_records

        pairs = [to_pair(r) for r in load_records(source, limit=limit)]
        examples, _ = encode_pairs(self.tokenizer, pairs, self.template, max_length)
        return pairwise_accuracy(self.model, examples, self.tokenizer.pad_token_id)


def load_reward_model(run_dir: str | Path, device: str = "auto") -> RewardModel:
    """Rebuild the reward model a `objective: reward` run saved in `run_dir`."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ..adapters.base import get_method
    from ..config import load_config
    from ..data.templates import get_template
    from ..errors import TunelabError
    from ..models.load import load_model

    run_dir = Path(run_dir)
    if not (run_dir / HEAD_FILE).exists():
        raise TunelabError(f"{run_dir}: no {HEAD_FILE}; not a finished reward-model run")
    cfg = load_config(run_dir / "config.yaml")
    if (run_dir / "model").exists():
        model, tok = load_model(str(run_dir / "model"), cfg.model.dtype, device)
    else:
        model, _ = load_model(cfg.model.name, cfg.model.dtype, device, cfg.model.trust_remote_code)
        get_method(cfg.method).load_peft(model, run_dir / "adapter")
        tok = AutoTokenizer.from_pretrained(str(run_dir / "adapter"))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    head = add_reward_head(model)
    with torch.no_grad():
        head.weight.copy_(load_file(str(run_dir / HEAD_FILE))["weight"])
    model.eval()
    return RewardModel(model, tok, get_template("auto", tok))

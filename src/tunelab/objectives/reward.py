"""Reward model: a Bradley–Terry scalar head on the language model (Christiano et al. 2017; Ouyang et al. 2022).

    r_φ(x, y) = w · h_last(x, y)          h_last: the final hidden state at the sequence's last token
    L = −log σ(r⁺ − r⁻ − m) + c·(r⁺ + r⁻)²

m is the pair's margin (data field ``margin``, default 0; Llama 2 §3.2.2 uses graded margins) and c =
``reward.center_rewards`` pulls rewards towards zero mean (Eisenstein et al. 2023, arXiv:2312.09244; TRL's
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
from functools import partial
from pathlib import Path

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import Strict
from .base import RunHooks
from .logprobs import forward_hidden
from .pairwise import PairMetrics
from .scoring import score_batches

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


class RewardOptions(Strict):
    """The ``reward:`` section."""

    moved_from: ClassVar[dict[str, str]] = {"pref.center_rewards": "center_rewards"}

    center_rewards: float = Field(0.0, ge=0.0)  # c in c·(r⁺ + r⁻)²


class RewardModelObjective(PairMetrics, RunHooks):
    """Bradley–Terry reward model: the LM with a scalar head on the last token's hidden state. Not a generator
    (no learning/forgetting tasks); the head is saved beside the adapter/model folder, which stays a plain LM."""

    name = "reward"
    data_kind = "pairs"
    needs_reference = False
    generator = False
    Options = RewardOptions

    @classmethod
    def from_config(cls, cfg, reference=None):
        return cls(cls.options(cfg).center_rewards)

    @classmethod
    def prepare_model(cls, model, cfg=None) -> None:
        add_reward_head(model)

    @contextmanager
    def saving(self, model, out: Path):
        save_reward_head(model, out)
        with head_detached(model):
            yield

    def extra_results(self, model, evals: list, pad_id: int) -> dict:
        return {"eval_pairwise_accuracy": pairwise_accuracy(model, evals, pad_id)} if evals else {}

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


def pairwise_accuracy(model, examples: list, pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Share of pairs the reward model orders correctly (r⁺ > r⁻), and the mean margin r⁺ − r⁻."""
    from ..data.preference import collate_pairs

    def margins(model, batch: dict) -> torch.Tensor:
        r = rewards(model, batch)  # rows [chosen_1..chosen_P, rejected_1..rejected_P]
        P = r.shape[0] // 2
        return (r[:P] - r[P:]).cpu()

    diffs = score_batches(model, examples, partial(collate_pairs, pad_id=pad_id), margins, batch_size=batch_size)
    d = torch.cat(diffs) if diffs else torch.zeros(0)
    return {"accuracy": float((d > 0).float().mean()) if len(d) else float("nan"),
            "margin": float(d.mean()) if len(d) else float("nan"), "n_pairs": len(d)}


class RewardModel:
    """A trained reward model: `score(prompt_messages, response)` → r(x, y); `encode_ids` + `score_encoded` for
    token ids as sampled.

    Every scoring call runs the model through `scoring.score_batches` (no gradients, eval mode, the model's
    training flag restored afterwards), so the model needs no ``eval()`` of its own."""

    def __init__(self, model, tokenizer, template):
        self.model, self.tokenizer, self.template = model, tokenizer, template

    def prompt_ids(self, prompt: list[dict]) -> list[int]:
        """The prompt rendered by this model's template up to the assistant's turn, tokenised as the policy's
        prompts are (`rl.prompts`: no special tokens added)."""
        return self.tokenizer(self.template.generation_prompt(prompt), add_special_tokens=False)["input_ids"]

    def encode(self, prompt: list[dict] | str, response: str, closed: bool = True):
        """`Encoded` of the text pair: `closed` renders the whole turn with this model's template (end of turn
        included, as its training pairs were); `closed=False` (a completion cut by the token budget) is the prompt
        up to the assistant's turn + the response text, *no* end of turn appended."""
        from ..data.masking import Encoded
        from ..data.preference import encode_response

        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if closed:
            return encode_response(self.tokenizer, self.template, prompt, {"role": "assistant", "content": response},
                                   "", None)
        head = self.prompt_ids(prompt)
        ids = self.tokenizer(self.template.generation_prompt(prompt) + response, add_special_tokens=False)["input_ids"]
        return Encoded(ids, [False] * len(head) + [True] * (len(ids) - len(head)), False, len(ids) - len(head))

    def score(self, prompt: list[dict] | str, response: str, closed: bool = True) -> float:
        """r(x, y) of `response` to `prompt`, re-tokenised from text (`encode`)."""
        return self.score_encoded([self.encode(prompt, response, closed)])[0]

    def encode_ids(self, prompt_ids: list[int], completion_ids: list[int], closed: bool = False):
        """`Encoded` of prompt ids + completion ids *as given*: no decode/encode round trip, and no end of turn
        added — a sampled end-of-turn/eos id is part of the completion ids. `closed` (the row stopped by itself) and
        the completion's last id is the template's end of turn: the tokens this template puts after a closed turn
        follow (ChatML's ``"\n"`` after ``<|im_end|>``; none for Llama 3), so r is read at the position it was
        trained at (`encode`'s pairs end there). A cut row (`closed=False`) is scored exactly as given."""
        from ..data.masking import Encoded

        p, c = list(prompt_ids), list(completion_ids)
        eot, after = self.turn_closing()
        tail = after if closed and c and c[-1] == eot else []
        return Encoded(p + c + tail, [False] * len(p) + [True] * len(c) + [False] * len(tail), False, len(c))

    def turn_closing(self) -> tuple[int | None, list[int]]:
        """(the end-of-turn id, the ids after it) of an assistant turn as this model's template closes it — read
        from the encoding of a probe conversation: the last trained token (the eot) and what follows it."""
        if not hasattr(self, "_closing"):
            enc = self.encode([{"role": "user", "content": "?"}], "!", closed=True)
            last = max((i for i, m in enumerate(enc.loss_mask) if m), default=None)
            self._closing = (None, []) if last is None else (enc.input_ids[last], enc.input_ids[last + 1:])
        return self._closing

    def score_encoded(self, examples: list, batch_size: int = 8) -> list[float]:
        """r of each `Encoded`, `batch_size` sequences per forward (right-padded; r at each row's last real token)."""
        from ..data.collate import collate

        out = score_batches(self.model, examples, partial(collate, pad_id=self.tokenizer.pad_token_id),
                            lambda m, b: rewards(m, b).float().cpu(), batch_size=batch_size)
        return [float(x) for r in out for x in r]

    def accuracy(self, source: str, max_length: int | None = None, limit: int | None = None) -> dict[str, float]:
        """`pairwise_accuracy` on a preference file or dataset."""
        from ..data.preference import encode_pairs, to_pair
        from ..data.sources import load_records

        pairs = [to_pair(r) for r in load_records(source, limit=limit)]
        examples, _ = encode_pairs(self.tokenizer, pairs, self.template, max_length)
        return pairwise_accuracy(self.model, examples, self.tokenizer.pad_token_id)


def load_reward_model(run_dir: str | Path, device: str = "auto") -> RewardModel:
    """Rebuild the reward model a `objective: reward` run saved in `run_dir`: the run as `saved_run.load_run`
    loads it (weights, tokenizer, the run's own chat template) plus its head."""
    from safetensors.torch import load_file

    from ..errors import TunelabError
    from .saved_run import load_run

    run_dir = Path(run_dir)
    if not (run_dir / HEAD_FILE).exists():
        raise TunelabError(f"{run_dir}: no {HEAD_FILE}; not a finished reward-model run")
    model, tok, template = load_run(run_dir, device, dtype=None)
    head = add_reward_head(model)
    with torch.no_grad():
        head.weight.copy_(load_file(str(run_dir / HEAD_FILE))["weight"])
    return RewardModel(model, tok, template)

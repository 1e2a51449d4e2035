"""Divergence is diagnosed: a non-finite loss/gradient (any objective) or an NLL collapsing to ln(vocab) stops the
run with one line, keeps the last good checkpoint (the diverged state's is dropped) and exports nothing; the rule
stays quiet on healthy SFT, preference and RL curves. Non-finite weights are never written."""

import json
import math

import pytest
import torch

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.config import DivergenceConfig, RunConfig, TrainConfig, load_config
from tunelab.data.batches import StaticBatches
from tunelab.data.collate import collate
from tunelab.data.masking import Encoded
from tunelab.errors import TunelabError
from tunelab.objectives.sft import SFT
from tunelab.train import checkpoint as ckpt
from tunelab.train.guards import DivergenceGuard
from tunelab.train.launch import train
from tunelab.train.loop import fit

V = 49152  # the SmolLM2 vocabulary: ln V ≈ 10.80
ON = DivergenceConfig()


def _first_alarm(curve, nll=True, cfg=ON):
    guard = DivergenceGuard(cfg, V, nll)
    for i, (loss, gnorm) in enumerate(curve, start=1):
        if guard.check(loss, gnorm):
            return i
    return None


HEALTHY = {  # (loss, grad norm) per step
    "sft_from_random_init": [(10.85, 0.9), (10.88, 5.3), (10.6, 3.0), (9.8, 2.0), (8.0, 1.5), (5.0, 1.0), (4.2, 1.0)],
    "sft_hard_batch": [(2.0, 1.0), (1.8, 1.0), (4.5, 3.0), (1.7, 1.0)],  # a spike far from ln V
    "sft_converged": [(0.3, 0.1), (0.01, 1e-9), (0.0, 0.0)],  # memorised: no gradient, but no high loss either
}
NOT_NLL = {
    "grpo_equal_rewards": [(0.0, 0.0)] * 4 + [(-0.4, 0.3), (0.0, 0.0), (2.5, 4.0), (-12.0, 1.0)],
    "dpo": [(0.693, 1.0), (0.2, 0.5), (0.01, 0.0), (3.0, 9.0), (11.0, 0.0)],
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_nll_curves_raise_no_alarm(name):
    assert _first_alarm(HEALTHY[name]) is None


@pytest.mark.parametrize("name", sorted(NOT_NLL))
def test_rl_and_preference_curves_are_judged_only_on_finiteness(name):
    assert _first_alarm(NOT_NLL[name], nll=False) is None
    assert _first_alarm(NOT_NLL[name] + [(math.nan, 0.0)], nll=False) == len(NOT_NLL[name]) + 1


@pytest.mark.parametrize("curve,at,words", [
    ([(10.85, 0.9), (10.88, 5.3), (10.85, 21.0), (10.80, 0.0)], 4, "vanished gradient"),  # the run
    ([(10.8, 1.0), (6.0, 1.0), (3.0, 1.0), (2.5, 1.0), (10.8, 0.4)], 5, "collapsed to 10.8"),
    ([(3.0, 1.0), (597.3, 1632.0)], 2, "collapsed to 597.3"),  # full finetuning at lr 5
    ([(math.inf, 1.0)], 1, "non-finite"),
    ([(3.0, 1.0), (2.0, math.nan)], 2, "non-finite"),
])
def test_divergence_is_diagnosed(curve, at, words):
    assert _first_alarm(curve) == at
    guard = DivergenceGuard(ON, V, True)
    diagnoses = [guard.check(*step) for step in curve]
    assert words in diagnoses[-1]
    assert _first_alarm(curve, cfg=DivergenceConfig(enabled=False)) is None  # the switch


def _cfg(tmp_path, tokenizer, **train_opts):
    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))
    return load_config(write_config(
        tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), method="lora", model={"name": str(model_dir)},
        data={"train": str(data), "max_length": 96, "eval_max": 4}, lora={"r": 4},
        train={"max_steps": 12, "batch_size": 2, "warmup_steps": 0, "save_every": 1, "keep_last": 1, **train_opts},
        samples={"n_heldout": 0}))


def test_absurd_learning_rate_stops_with_a_diagnosis(tmp_path, tokenizer):
    # lr 50: the loss settles at ln(vocab) with a zero gradient from step 4 on; before, the run exited 0 and
    # saved that adapter
    with pytest.raises(TunelabError) as e:
        train(_cfg(tmp_path, tokenizer, lr=50.0))
    out = tmp_path / "out"
    msg = str(e.value)
    assert msg.startswith("training diverged at step 4: loss stuck at 10.8") and "vanished gradient" in msg
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in msg and "\n" not in msg
    # step 3's weights gave the stuck loss: their checkpoint is dropped, step 2's survived keep_last=1 (pruning
    # waits until the next step's loss is judged), nothing is exported
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert not (out / "adapter").exists() and not (out / "results.json").exists()


class NaNAt:
    """SFT whose loss turns NaN from the `at`-th call on (a numerical blow-up)."""
    nll_loss = True

    def __init__(self, at):
        self.sft, self.at, self.calls = SFT(), at, 0

    def loss(self, model, batch):
        self.calls += 1
        ls, n, m = self.sft.loss(model, batch)
        return (ls * math.nan if self.calls >= self.at else ls), n, m


def _batches():
    examples = [Encoded(list(range(5, 15 + i)), [False] * 2 + [True] * (8 + i), False, 8 + i) for i in range(4)]
    return StaticBatches(lambda e: [collate(examples[k:k + 2], pad_id=0) for k in (0, 2)], 2)


def test_non_finite_loss_keeps_the_last_good_checkpoint(tiny, tmp_path):
    model = tiny("llama")
    cfg = TrainConfig(max_steps=6, save_every=1, keep_last=1, lr=1e-3)
    with pytest.raises(TunelabError, match=r"^training diverged at step 3: loss nan, gradient norm nan \(non-finite\)"):
        fit(model, NaNAt(3), _batches(), cfg, tmp_path)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == ["step-000001"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the optimizer never took the NaN step


def test_non_finite_weights_are_never_written(tiny, tmp_path, tokenizer):
    from tunelab.data.templates import get_template
    from tunelab.train.artifacts import save_artifacts

    model = tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = math.inf
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TunelabError, match="refusing to write checkpoint step-000001: tensor 'model.layers.0.mlp"):
        ckpt.save_checkpoint(tmp_path / "checkpoints", 1, model, opt,
                             torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), {}, keep_last=1)
    assert not (tmp_path / "checkpoints").exists()
    cfg = RunConfig(method="full", output_dir=str(tmp_path))
    with pytest.raises(TunelabError, match="refusing to write model/: tensor 'model.layers.0.mlp.up_proj.weight'"):
        save_artifacts(model, tokenizer, get_template("chatml", tokenizer), cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_grpo_with_equal_rewards_is_no_divergence(tmp_path, tokenizer, monkeypatch):
    # every completion scores the same: zero advantages, so the loss and the gradient are exactly 0 every step
    (tmp_path / "equal_rewards.py").write_text("def one(batch):\n    return [1.0] * len(batch.completion_ids)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something about {w}.", "answer": "x"}
                                              for w in "abcdefgh"])
    out = train(load_config(write_config(
        tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), method="lora", objective="grpo",
        model={"name": str(model_dir)}, data={"train": str(data), "max_length": 64, "eval_fraction": 0.25},
        train={"max_steps": 3, "batch_size": 8, "lr": 2e-3, "warmup_steps": 0},
        rl={"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 4, "rewards": [{"name": "equal_rewards:one"}],
            "eval_prompts": 1}, samples={"n_heldout": 0})))
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [(0.0, 0.0)] * 3
    assert (out / "adapter").is_dir()


def test_export_refuses_a_non_finite_adapter(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    from tunelab.export import export_merged

    out = train(_cfg(tmp_path, tokenizer, lr=1e-3, max_steps=2))
    weights = out / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = math.nan  # e.g. an adapter written by a tunelab without these checks
    save_file(tensors, str(weights))
    with pytest.raises(TunelabError, match=f"^refusing to write the merged model {tmp_path / 'merged'}: tensor '"):
        export_merged(out, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not (tmp_path / ".tmp-merged").exists()


def test_a_divergence_still_undoes_what_the_loop_did_to_the_model(tiny, tmp_path):
    # memory mode checkpoints every MLP by replacing its forward; the loop must put the originals back even when
    # the divergence guard raises out of it (was: skipped, leaving a model that recomputes its MLPs forever)
    model = tiny("llama")
    mlps = [layer.mlp for layer in model.model.layers]
    cfg = TrainConfig(max_steps=6, lr=1e-3, memory_mode=True)
    with pytest.raises(TunelabError, match="training diverged at step 2"):
        fit(model, NaNAt(2), _batches(), cfg, tmp_path)
    assert all("forward" not in m.__dict__ for m in mlps)


def test_batch_tokens_counts_real_tokens_only():
    from tunelab.train.loop import batch_tokens

    packed = {"seq_ids": torch.tensor([[0, 0, 1, -1]]), "attention_mask": torch.ones(1, 1, 4, 4),
              "input_ids": torch.zeros(1, 4)}
    assert batch_tokens(packed) == 3
    assert batch_tokens({"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]), "input_ids": torch.zeros(2, 3)}) == 3
    assert batch_tokens({"attention_mask": torch.ones(2, 1, 3, 3, dtype=torch.bool),
                         "input_ids": torch.zeros(2, 3)}) == 6

"""The one batched scoring loop (`objectives.scoring`) and the evaluations built on it, each checked against a
straightforward unbatched computation from full logits: eval_mode restores the flag even on error, batches keep
their order and composition, and eval_loss / nll_sums / evaluate_pairs / pairwise_accuracy / compute_pairs /
RewardModel.score give what one-example-at-a-time arithmetic gives."""

import math

import pytest
import torch
from pref_helpers import pair_rows
from torch import nn

from tunelab.data.collate import collate
from tunelab.data.masking import Encoded
from tunelab.data.preference import encode_pairs, to_pair
from tunelab.data.sources import Record
from tunelab.data.templates import get_template
from tunelab.models.modes import eval_mode
from tunelab.objectives.scoring import eval_loss, score_batches, score_rows

PAD = 0


def _encoded(n: int, seed: int = 1) -> list[Encoded]:
    """n examples of different lengths, with the first few tokens of each masked (a "prompt")."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + (7 * i) % 11
        ids = torch.randint(1, 49152, (length,), generator=g).tolist()
        mask = [False] * (1 + i % 3) + [True] * (length - 1 - i % 3)
        out.append(Encoded(ids, mask, n_trained=sum(mask)))
    return out


@torch.no_grad()
def _logp_sum(model, ex: Encoded) -> tuple[float, int]:
    """Σ log p(target | prefix) over ex's loss tokens, from the full logits of ex alone (no padding)."""
    ids = torch.tensor([ex.input_ids])
    logp = model(ids).logits[0, :-1].float().log_softmax(-1)
    lp = logp.gather(1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(ex.loss_mask[1:])
    return float(lp[mask].sum()), int(mask.sum())


def _pairs(tokenizer, n: int):
    tmpl = get_template("chatml", tokenizer)
    return encode_pairs(tokenizer, [to_pair(Record(r, f"f:{i}")) for i, r in enumerate(pair_rows(n))], tmpl)[0]


# ----------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_flag_even_on_error(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with eval_mode(model) as m:
        assert m is model and not model.training and not model[1].training
    assert model.training is training and model[1].training is training
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            assert not model.training
            raise RuntimeError("boom")
    assert model.training is training and model[1].training is training


def test_score_batches_keeps_order_and_composition():
    model = nn.Linear(2, 2).train()
    examples = list(range(7))
    seen = []

    def collate_fn(chunk):
        seen.append(chunk)
        return {"x": torch.tensor(chunk), "tag": "kept"}

    def fn(m, batch):
        assert m is model and not m.training and not torch.is_grad_enabled()
        assert batch["tag"] == "kept" and batch["x"].device == next(model.parameters()).device
        return batch["x"].tolist()

    out = score_batches(model, examples, collate_fn, fn, batch_size=3)
    assert seen == [[0, 1, 2], [3, 4, 5], [6]] and out == seen
    assert model.training and torch.is_grad_enabled()  # both restored
    assert score_batches(model, [], collate_fn, fn, batch_size=3) == []
    with pytest.raises(ValueError, match="batch_size"):
        score_batches(model, examples, collate_fn, fn, batch_size=0)


def test_score_rows_sorts_batches_and_returns_input_order():
    model = nn.Linear(2, 2)
    words = ["ccc", "a", "bbbb", "dd", "e"]
    batches = []

    def fn(_, batch):
        batches.append(batch["w"])
        return [w.upper() for w in batch["w"]]

    out = score_rows(model, words, lambda chunk: {"w": chunk}, fn, batch_size=2, sort_key=len)
    assert out == [w.upper() for w in words]
    assert batches == [["a", "e"], ["dd", "ccc"], ["bbbb"]]  # stable sort by length, then chunks of 2
    assert score_rows(model, words, lambda chunk: {"w": chunk}, fn, batch_size=2) == [w.upper() for w in words]
    with pytest.raises(ValueError, match="results"):
        score_rows(model, words, lambda chunk: {"w": chunk}, lambda _, b: b["w"][:1], batch_size=2)


# -------------------------------------------------------------------------------------- built on the loop
def test_eval_loss_is_the_token_weighted_mean_nll(tiny):
    model = tiny("llama").train()
    examples = _encoded(5)
    parts = [_logp_sum(model.eval(), ex) for ex in examples]
    model.train()
    want = -sum(s for s, _ in parts) / sum(n for _, n in parts)
    got = eval_loss(model, examples, PAD, batch_size=2)
    assert got == pytest.approx(want, rel=1e-5)
    assert model.training  # restored
    assert math.isnan(eval_loss(model, [], PAD))


def test_nll_sums_per_example_in_input_order(tiny):
    from tunelab.eval.perplexity import nll_sums

    model = tiny("llama").eval()
    examples = _encoded(6)
    got = nll_sums(model, examples, PAD, batch_size=4)
    for ex, (nll, n) in zip(examples, got):
        lp, count = _logp_sum(model, ex)
        assert nll == pytest.approx(-lp, rel=1e-5) and n == count


def test_evaluate_pairs_averages_over_pairs(tiny, tokenizer):
    from tunelab.objectives.dpo import DPO
    from tunelab.objectives.pairwise import evaluate_pairs
    from tunelab.objectives.reference import Reference

    model = tiny("llama")
    exs = _pairs(tokenizer, 5)
    got = evaluate_pairs(model, DPO(reference=Reference(model)), exs, tokenizer.pad_token_id, batch_size=3)
    model.eval()
    lc = torch.tensor([_logp_sum(model, e.chosen) for e in exs])
    lr = torch.tensor([_logp_sum(model, e.rejected) for e in exs])
    d, da = lc[:, 0] - lr[:, 0], lc[:, 0] / lc[:, 1] - lr[:, 0] / lr[:, 1]
    # The reference is a copy of the policy: every pair's DPO loss is −log σ(0) = log 2, every reward 0.
    assert got["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert got["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert got["logp_margin"] == pytest.approx(float(d.mean()), abs=1e-4)
    assert got["avg_logp_margin"] == pytest.approx(float(da.mean()), abs=1e-5)
    assert got["logp_accuracy"] == pytest.approx(float((d > 0).float().mean()))
    assert got["logp_chosen"] == pytest.approx(float(lc[:, 0].mean()), abs=1e-4)


def test_pairwise_accuracy_and_reward_model_score(tiny, tokenizer):
    from tunelab.objectives.reward import RewardModel, add_reward_head, pairwise_accuracy, rewards

    model = tiny("llama")
    add_reward_head(model)
    with torch.no_grad():  # a head that orders some pairs each way
        model.reward_head.weight.normal_(0, 1.0)
    exs = _pairs(tokenizer, 5)
    pad = tokenizer.pad_token_id
    got = pairwise_accuracy(model.train(), exs, pad, batch_size=2)
    assert model.training
    model.eval()
    one = torch.no_grad()(lambda enc: float(rewards(model, collate([enc], pad))[0]))  # one sequence, no padding
    d = torch.tensor([one(e.chosen) - one(e.rejected) for e in exs])
    assert got["n_pairs"] == 5
    assert got["accuracy"] == pytest.approx(float((d > 0).float().mean()))
    assert got["margin"] == pytest.approx(float(d.mean()), abs=1e-5)
    assert math.isnan(pairwise_accuracy(model, [], pad)["accuracy"])

    rm = RewardModel(model.train(), tokenizer, get_template("chatml", tokenizer))
    prompt, response = "Question number 1: is 1 a number?", "Yes, 1 is a number."
    score = rm.score(prompt, response)
    assert model.training  # score() no longer leaves the model in eval mode
    r = to_pair(Record(pair_rows(2)[1], "f:1"))
    [ex], _ = encode_pairs(tokenizer, [r], get_template("chatml", tokenizer))
    model.eval()
    assert response == r.chosen["content"] and score == pytest.approx(one(ex.chosen), abs=1e-5)


def test_compute_pairs_matches_per_sequence_reference_logps(tiny, tokenizer):
    from tunelab.objectives.reference import Reference, compute_pairs

    model = tiny("llama")
    exs = _pairs(tokenizer, 5)
    ref = Reference(model)  # a frozen copy
    with torch.no_grad():
        for p in model.parameters():  # move the policy away: the reference must not follow
            p.add_(torch.randn_like(p) * 0.05)
    got = compute_pairs(ref, exs, tokenizer.pad_token_id, batch_size=2)
    assert got.shape == (5, 2) and got.device.type == "cpu"
    want = torch.tensor([[_logp_sum(ref.model.eval(), e.chosen)[0], _logp_sum(ref.model, e.rejected)[0]]
                         for e in exs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert compute_pairs(ref, [], tokenizer.pad_token_id).shape == (0, 2)


def test_target_mask_never_targets_the_first_position():
    import torch

    from tunelab.objectives.logprobs import target_mask

    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = target_mask(mask)
    assert out.dtype == torch.bool and out.tolist() == [[False, True, False], [False, True, True]]
    assert mask.tolist() == [[1, 1, 0], [0, 1, 1]]  # a new tensor: the batch's mask is untouched

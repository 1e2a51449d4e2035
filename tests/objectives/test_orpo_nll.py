"""ORPO's NLL term is over prompt + chosen response by default, as in TRL's ORPOTrainer and the paper's code.

TRL 1.16 (`trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics`) runs on the very same token batches of a
tiny Llama (pad == eos, so attention masks are always passed and an end-of-turn eos inside a sequence counts);
a hand computation from the full logits checks both the default and `pref.orpo_prompt_loss: false`.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.masking import Encoded
from tunelab.data.preference import PairExample, collate_pairs
from tunelab.models.tiny import tiny_model
from tunelab.objectives.orpo import ORPO, orpo_losses, sequence_targets

PAD = EOS = 2
LAM = 0.1


def enc(prompt: list[int], response: list[int]) -> Encoded:
    ids = prompt + response
    mask = [False] * len(prompt) + [True] * len(response)
    return Encoded(ids, mask, False, len(response), "test")


# (prompt, chosen, rejected): prompts of different lengths, responses ending in eos (== pad)
PAIRS = [
    ([1, 17, 33, 5, 9], [40, 41, 42, EOS], [50, 51, EOS]),
    ([1, 8, 3], [60, 61, 62, 63, 64, EOS], [70, EOS]),
    ([1, 90, 91, 92, 93, 94, 95], [11, EOS], [12, 13, 14, 15, 16, EOS]),
]


def examples(pairs=PAIRS):
    return [PairExample(enc(p, c), enc(p, r), "test") for p, c, r in pairs]


@pytest.fixture
def model():
    return tiny_model("llama", seed=0, vocab_size=128).eval()


def ours(model, pairs=PAIRS, **kw):
    """tunelab's loss per pair (the sum over pairs divided by the number of pairs, as the loop does)."""
    obj = ORPO(LAM, **kw)
    loss, n, metrics = obj.loss(model, collate_pairs(examples(pairs), PAD))
    return loss / n, metrics


# ------------------------------------------------------------------------------------------- by hand
def _hand(model, prompt, chosen, rejected, prompt_loss=True):
    def logps(ids):
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        return [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]  # token t given tokens < t

    c, r = logps(prompt + chosen), logps(prompt + rejected)
    ac = sum(c[len(prompt) - 1:]) / len(chosen)  # response tokens only
    ar = sum(r[len(prompt) - 1:]) / len(rejected)
    lor = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
    nll = -sum(c) / len(c) if prompt_loss else -ac  # every token after the first, or the response only
    return nll - LAM * math.log(1 / (1 + math.exp(-lor))), nll


@pytest.mark.parametrize("prompt_loss", [True, False])
def test_orpo_by_hand(model, prompt_loss):
    want = [_hand(model, *p, prompt_loss=prompt_loss) for p in PAIRS]
    got, metrics = ours(model, prompt_loss=prompt_loss)
    assert got.item() == pytest.approx(sum(w for w, _ in want) / len(want), abs=1e-5)
    assert metrics["nll"] == pytest.approx(sum(n for _, n in want) / len(want), abs=1e-5)
    for (w, _), pair in zip(want, PAIRS):  # and each pair alone
        assert ours(model, [pair], prompt_loss=prompt_loss)[0].item() == pytest.approx(w, abs=1e-5)


def test_orpo_losses_with_an_nll_term():
    ac, ar, nll = torch.tensor([-2.5]), torch.tensor([-2.4]), torch.tensor([1.7])
    lor = (-2.5 + 2.4) - (math.log(1 - math.exp(-2.5)) - math.log(1 - math.exp(-2.4)))
    want = 1.7 - 0.1 * math.log(1 / (1 + math.exp(-lor)))
    assert orpo_losses(ac, ar, 0.1, nll)[0].item() == pytest.approx(want, rel=1e-6)
    assert orpo_losses(ac, ar, 0.1)[0].item() == pytest.approx(want - 1.7 + 2.5, rel=1e-6)  # default −ā⁺


def test_sequence_targets_skip_padding_and_first_tokens():
    b = collate_pairs(examples(PAIRS[:1]), PAD)  # chosen 9 tokens, rejected 8 (+1 pad)
    m = sequence_targets(b)
    assert m[0].tolist() == [False] + [True] * 8 and m[1].tolist() == [False] + [True] * 7 + [False]
    assert m.equal(sequence_targets({"attention_mask": b["attention_mask"]}))  # without seq_ids too


# ------------------------------------------------------------------------------------------------- TRL
class Acc:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x


def trl_loss(model, pairs):
    """TRL's ORPO loss on the same tokens: its own concatenation, padding, NLL and odds-ratio code."""
    ORPOTrainer = pytest.importorskip("trl.experimental.orpo").ORPOTrainer

    fake = SimpleNamespace(is_encoder_decoder=False, padding_value=PAD, accelerator=Acc(), aux_loss_enabled=False,
                           beta=LAM, concatenated_inputs=ORPOTrainer.concatenated_inputs,
                           get_batch_logps=ORPOTrainer.get_batch_logps)
    fake.concatenated_forward = lambda m, b: ORPOTrainer.concatenated_forward(fake, m, b)
    fake.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(fake, c, r)
    batch = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        rows = [enc(p[0], p[k]) for p in pairs]
        T = max(len(e) for e in rows)
        ids = torch.full((len(rows), T), PAD)
        att = torch.zeros((len(rows), T), dtype=torch.long)
        labels = torch.full((len(rows), T), -100)
        for i, e in enumerate(rows):
            n = len(e)
            ids[i, :n] = torch.tensor(e.input_ids)
            att[i, :n] = 1
            labels[i, :n] = torch.where(torch.tensor(e.loss_mask), ids[i, :n], -100)
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": att, f"{side}_labels": labels})
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(fake, model, batch)
    return loss, metrics


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_orpo_equals_trl_on_one_pair(model, i):
    theirs, tm = trl_loss(model, [PAIRS[i]])
    got, m = ours(model, [PAIRS[i]])
    assert got.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert m["nll"] == pytest.approx(tm["nll_loss"], abs=1e-5)
    assert m["log_odds_ratio"] == pytest.approx(tm["log_odds_chosen"], abs=1e-5)
    assert m["reward_chosen"] == pytest.approx(tm["rewards/chosen"], abs=1e-6)


def test_orpo_gradients_equal_trl(model):
    pair = [PAIRS[1]]
    theirs, _ = trl_loss(model, pair)
    g_theirs = torch.autograd.grad(theirs, list(model.parameters()))
    got, _ = ours(model, pair)
    g_ours = torch.autograd.grad(got, list(model.parameters()))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_orpo_batch_equals_trl_when_chosen_lengths_match(model):
    # chosen sequences of equal length (9 tokens), rejected ones of different lengths
    pairs = [PAIRS[0], ([1, 8, 3, 4], [60, 61, 62, 63, EOS], [70, EOS])]
    theirs, _ = trl_loss(model, pairs)
    assert ours(model, pairs)[0].item() == pytest.approx(theirs.item(), abs=1e-5)


def test_orpo_batch_is_the_mean_of_its_pairs(model):
    # chosen lengths differ: tunelab averages per pair (exact under gradient accumulation); TRL per batch token
    singles = [trl_loss(model, [p])[0].item() for p in PAIRS]
    assert ours(model)[0].item() == pytest.approx(sum(singles) / len(singles), abs=1e-5)


def test_response_only_option_differs_from_trl(model):
    theirs, tm = trl_loss(model, [PAIRS[0]])
    got, m = ours(model, [PAIRS[0]], prompt_loss=False)
    assert abs(m["nll"] - tm["nll_loss"]) > 1e-3  # the prompt really changes the NLL
    assert m["nll"] == pytest.approx(-tm["logps/chosen"], abs=1e-5)  # = −ā⁺


def test_config_option_reaches_the_objective():
    from tunelab.objectives import build_objective, run_config_schema

    RunConfig = run_config_schema()
    assert build_objective(RunConfig(objective="orpo")).prompt_loss is True
    cfg = RunConfig(objective="orpo", orpo={"prompt_loss": False})
    assert build_objective(cfg).prompt_loss is False

"""Multiple choice: acc vs acc_norm on a model whose log-likelihoods are known by construction, and the
continuation scorer against full logits."""

import math

import pytest
import torch

from tunelab.data.templates import get_template
from tunelab.eval.choice import encode_pair, evaluate_choice, score_continuations


def uniform_model(tiny):
    """lm_head = 0 → every token has probability 1/V, so ll(choice) = −(its token count)·log V exactly."""
    model = tiny("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    return model


def test_acc_and_acc_norm_by_construction(tokenizer, tiny, make_task):
    short, long = "the", "internationalization"
    n_short = len(tokenizer(" " + short)["input_ids"])
    n_long = len(tokenizer(" " + long)["input_ids"])
    # Fewer tokens wins acc; more characters per token wins acc_norm: the two metrics must disagree.
    assert n_short < n_long and n_short / len(short) > n_long / len(long)
    rows = [{"question": "Pick one.", "choices": [short, long], "answer": 0},
            {"question": "Pick one.", "choices": [short, long], "answer": 1},
            {"question": "Pick one.", "choices": [long, short], "answer": 1}]
    task = make_task(rows, kind="choice", prompt="Q: {question}\nA:")
    model = uniform_model(tiny)
    res = evaluate_choice(model, tokenizer, get_template("chatml", tokenizer), task)
    assert res["n"] == 3
    # acc picks `short` every time: right on items 0 and 2. acc_norm picks `long`: right on item 1 only.
    assert res["metrics"]["acc"] == pytest.approx(2 / 3)
    assert res["metrics"]["acc_norm"] == pytest.approx(1 / 3)
    assert [it["score"] for it in res["items"]] == [0.0, 1.0, 0.0]  # per item: acc_norm (the primary metric)
    assert [it["acc"] for it in res["items"]] == [1.0, 0.0, 1.0]
    assert len({it["id"] for it in res["items"]}) == 3
    lls = res["samples"][0]["loglikelihoods"]
    log_v = math.log(model.config.vocab_size)
    assert lls == pytest.approx([-n_short * log_v, -n_long * log_v], rel=1e-5)


def test_answer_may_be_the_choice_text_and_chat_mode(tokenizer, tiny, make_task):
    rows = [{"q": "Colour of the sky?", "opts": ["blue", "a colour nobody has ever seen"], "gold": "blue"}]
    task = make_task(rows, kind="choice", prompt="{q}", choices_field="opts", answer_field="gold", chat=True)
    res = evaluate_choice(uniform_model(tiny), tokenizer, get_template("chatml", tokenizer), task)
    assert res["samples"][0]["answer"] == 0 and res["metrics"]["acc"] == 1.0


def test_continuation_scores_match_full_logits(tokenizer, tiny):
    model = tiny("llama").eval()
    pairs = [("The capital of France is", " Paris"), ("2 + 2 = ", "4, obviously"), ("", "Hello world")]
    scores = score_continuations(model, tokenizer, pairs, batch_size=2, greedy=True)
    for (ctx, cont), s in zip(pairs, scores):
        enc = encode_pair(tokenizer, ctx, cont)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logp = model(ids).logits[0].log_softmax(-1)
        targets = [t for t, m in enumerate(enc.loss_mask) if m]
        want = sum(logp[t - 1, enc.input_ids[t]].item() for t in targets)
        greedy = all(logp[t - 1].argmax().item() == enc.input_ids[t] for t in targets)
        assert s.logprob == pytest.approx(want, rel=1e-4) and s.n_tokens == len(targets)
        assert s.is_greedy == greedy
    # lm-eval's split: the context's trailing space moves into the continuation.
    enc = encode_pair(tokenizer, "2 + 2 = ", "4")
    cont = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert tokenizer.decode(cont) == " 4"
    # An empty context still gets a first token to predict from.
    assert encode_pair(tokenizer, "", "Hello").loss_mask[0] is False


def test_greedy_flag_on_the_argmax_token(tokenizer, tiny):
    from tunelab.data.masking import Encoded
    from tunelab.eval.choice import score_encoded

    model = tiny("llama").eval()
    ids = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        nxt = model(torch.tensor([ids])).logits[0, -1].argmax().item()
    other = (nxt + 1) % model.config.vocab_size
    exs = [Encoded(ids + [t], [False] * len(ids) + [True]) for t in (nxt, other)]
    hit, miss = score_encoded(model, exs, tokenizer.pad_token_id, greedy=True)
    assert hit.is_greedy is True and miss.is_greedy is False and hit.logprob > miss.logprob

"""Ids-level sampling (tunelab.sampling.sample) on a tiny random Llama with the SmolLM2 tokenizer: greedy equals
Hugging Face greedy generation, the returned log-probs equal a scoring forward, seeds reproduce, stop tokens /
eos / stop strings end rows with the right mask and finish reason, and `generate()` keeps its old outputs."""

import pytest
import torch

from tunelab.generate import cut_at_stop, generate
from tunelab.sampling import Samples, sample, top_p_filter

PROMPTS = ["Hello there, how are you?", "2 + 2 =", "Write a very short poem about the sea and the sky, please.",
           "Hi"]


@pytest.fixture(scope="module")
def model():
    from tunelab.models.tiny import tiny_model

    return tiny_model("llama").eval()


def encode(tokenizer, prompts=PROMPTS):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def hf_greedy(model, tokenizer, prompts, max_new_tokens, stop=()):
    """The pre-sample() `generate` path: HF generate on a left-padded batch, decoded, cut, stripped."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    kw = dict(stop_strings=list(stop), tokenizer=tokenizer) if stop else {}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None, **kw)
    rows = out[:, enc["input_ids"].shape[1]:]
    return rows, [cut_at_stop(tokenizer.decode(r, skip_special_tokens=True), list(stop)).strip() for r in rows]


def test_greedy_equals_hf_generate_on_a_left_padded_batch(model, tokenizer):
    s = sample(model, tokenizer, encode(tokenizer), temperature=0, max_new_tokens=12, batch_size=len(PROMPTS))
    rows, texts = hf_greedy(model, tokenizer, PROMPTS, 12)
    assert s.completion_ids.shape == (len(PROMPTS), 12) and s.finish_reason == ("length",) * len(PROMPTS)
    assert s.completion_ids.tolist() == rows.tolist()
    assert [tokenizer.decode(r, skip_special_tokens=True).strip() for r in s.completions()] == texts
    # prompts come back left-padded with their mask
    lens = [len(p) for p in encode(tokenizer)]
    assert s.prompt_mask.sum(-1).tolist() == lens and s.prompt_ids.shape[1] == max(lens)
    assert s.prompt_mask[:, -1].tolist() == [1] * len(PROMPTS)


def score(model, s: Samples, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) of every completion token by one forward over prompt+completion."""
    ids = torch.cat([s.prompt_ids, s.completion_ids], dim=1)
    mask = torch.cat([s.prompt_mask, s.completion_mask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    P = s.prompt_ids.shape[1]
    lp = (logits[:, P - 1:-1].float() / temperature).log_softmax(-1)
    return lp.gather(-1, s.completion_ids.unsqueeze(-1)).squeeze(-1) * s.completion_mask


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (0.0, 1.0)])
def test_logprobs_equal_a_scoring_forward(model, tokenizer, temperature, top_p):
    s = sample(model, tokenizer, encode(tokenizer), n=2, temperature=temperature, top_p=top_p, max_new_tokens=10,
               seed=1, batch_size=3)
    assert s.logprobs.dtype == torch.float32 and s.logprobs.shape == s.completion_ids.shape
    torch.testing.assert_close(s.logprobs, score(model, s, temperature or 1.0), atol=1e-5, rtol=0)
    assert bool((s.logprobs[s.completion_mask.bool()] < 0).all())


def test_seed_reproduces_and_n_groups_rows_by_prompt(model, tokenizer):
    kw = dict(n=3, temperature=1.0, top_p=0.95, max_new_tokens=8, batch_size=4)
    a = sample(model, tokenizer, encode(tokenizer), seed=7, **kw)
    b = sample(model, tokenizer, encode(tokenizer), seed=7, **kw)
    c = sample(model, tokenizer, encode(tokenizer), seed=8, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    B = 3 * len(PROMPTS)
    assert a.completion_ids.shape[0] == B and len(a.finish_reason) == B
    assert a.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(3)]
    prompts = encode(tokenizer)
    for row in range(B):  # each row carries its own prompt
        p = a.prompt_ids[row][a.prompt_mask[row].bool()].tolist()
        assert p == prompts[int(a.prompt_index[row])]
    # the copies of a prompt are sampled independently
    assert len({tuple(r) for r in a.completions()[:3]}) > 1


def test_sampling_leaves_the_training_flag_and_global_rng_alone(model, tokenizer):
    model.train()
    state = torch.random.get_rng_state()
    try:
        sample(model, tokenizer, encode(tokenizer)[:1], temperature=1.0, max_new_tokens=3, seed=0)
        assert model.training and torch.equal(state, torch.random.get_rng_state())
    finally:
        model.eval()


class EosAs:
    """The real tokenizer with another eos id (a random model hardly ever emits the real one)."""

    def __init__(self, tokenizer, eos):
        self._tok, self.eos_token_id = tokenizer, eos

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_stop_token_and_eos_end_rows_with_the_mask_and_reason(model, tokenizer):
    prompts = encode(tokenizer)
    free = sample(model, tokenizer, prompts, temperature=0, max_new_tokens=10)
    row0 = free.completion_ids[0].tolist()
    stop_tok = row0[3]
    first = {i: r.index(stop_tok) if stop_tok in r else None for i, r in enumerate(free.completion_ids.tolist())}
    for tok, kw in ((tokenizer, dict(stop_token_ids=[stop_tok])), (EosAs(tokenizer, stop_tok), {})):
        s = sample(model, tok, prompts, temperature=0, max_new_tokens=10, **kw)
        for i, j in first.items():
            if j is None:
                assert s.finish_reason[i] == "length" and s.completion_mask[i].sum() == 10
                assert s.completion_ids[i].tolist() == free.completion_ids[i].tolist()
                continue
            assert s.finish_reason[i] == "stop"
            assert s.completion_mask[i].tolist()[:j + 1] == [1] * (j + 1) and s.completion_mask[i, j + 1:].sum() == 0
            assert s.completions()[i] == free.completion_ids[i].tolist()[:j + 1]
            assert (s.completion_ids[i, j + 1:] == tokenizer.pad_token_id).all()
            assert (s.logprobs[i, j + 1:] == 0).all()
        assert s.finish_reason[0] == "stop" and s.completion_mask[0].sum() <= 4
    # everyone stops → the loop ends early, T is the longest completion
    every = sample(model, tokenizer, prompts, temperature=0, max_new_tokens=10,
                   stop_token_ids=[r[0] for r in free.completion_ids.tolist()])
    assert every.completion_ids.shape[1] == 1 and every.finish_reason == ("stop",) * len(prompts)


def test_stop_string_ends_the_row_at_the_token_that_completes_it(model, tokenizer):
    prompts = encode(tokenizer)[:2]
    free = sample(model, tokenizer, prompts, temperature=0, max_new_tokens=12)
    ids = free.completions()[0]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    upto = len(tokenizer.decode(ids[:5], skip_special_tokens=False))
    stop = text[upto - 3:upto]  # ends inside token 4 (or spans 3 and 4)
    assert stop.strip() and text.find(stop) == upto - 3, "choose a stop string that first occurs there"
    s = sample(model, tokenizer, prompts, temperature=0, max_new_tokens=12, stop_strings=[stop])
    assert s.finish_reason[0] == "stop" and s.completions()[0] == ids[:5]
    assert generate(model, tokenizer, PROMPTS[:2], max_new_tokens=12, stop=[stop])[0] == text[:upto - 3].strip()


def test_generate_returns_the_same_strings_as_before(model, tokenizer):
    _, before = hf_greedy(model, tokenizer, PROMPTS, 10)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=len(PROMPTS)) == before
    # batched in twos, with stop strings taken from the texts themselves (HF's stop_strings path)
    stop = [before[0][4:7], before[2][-4:]]
    for k in (0, 2):
        _, old = hf_greedy(model, tokenizer, PROMPTS[k:k + 2], 10, stop=stop)
        assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2, stop=stop)[k:k + 2] == old
    assert generate(model, tokenizer, [], max_new_tokens=4) == []


def test_sampled_generate_is_text_of_sample(model, tokenizer):
    torch.manual_seed(3)
    out = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9,
                   strip=False)
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False] and kept(1.0) == [True] * 4
    assert kept(0.01) == [True, False, False, False]


def test_loreft_model_samples_like_hf_generate(tokenizer):
    from tunelab.adapters import loreft
    from tunelab.models.tiny import tiny_model

    model = tiny_model("llama").eval()
    loreft.wrap(model, {"r": 4, "positions": "f2+l2"})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "loreft" in name and "learned_source" in name:
                p.add_(torch.randn_like(p) * 0.5)
    s = sample(model, tokenizer, encode(tokenizer), temperature=0, max_new_tokens=6, batch_size=len(PROMPTS))
    rows, _ = hf_greedy(model, tokenizer, PROMPTS, 6)
    assert s.completion_ids.tolist() == rows.tolist()
    with loreft.disabled(model):  # the interventions do change the outcome
        plain = sample(model, tokenizer, encode(tokenizer), temperature=0, max_new_tokens=6, batch_size=len(PROMPTS))
    assert not torch.equal(plain.completion_ids, s.completion_ids)


def test_edge_cases_and_refusals(model, tokenizer):
    from tunelab.errors import TunelabError

    none = sample(model, tokenizer, encode(tokenizer)[:2], max_new_tokens=0)
    assert none.completion_ids.shape == (2, 0) and none.finish_reason == ("length", "length")
    for kw, msg in ((dict(n=0), "n=0"), (dict(temperature=-1), "negative"), (dict(top_p=0), "top_p"),
                    (dict(batch_size=0), "batch_size")):
        with pytest.raises(TunelabError, match=msg):
            sample(model, tokenizer, encode(tokenizer)[:1], **kw)
    with pytest.raises(TunelabError, match="prompt 1 is empty"):
        sample(model, tokenizer, [[1, 2], []])


def test_stopped_rows_leave_the_batch_and_results_do_not_change(model, tokenizer, monkeypatch):
    """Rows that stop early are dropped from the running batch (each decode forward covers only the rows still
    generating), and that changes nothing: greedy ids and log-probs equal each row sampled alone, and equal the
    fallback for caches that cannot drop rows (stopped rows decoding pad to the end)."""
    import tunelab.sampling as sampling

    prompts = encode(tokenizer)
    free = sample(model, tokenizer, prompts, temperature=0, max_new_tokens=10)
    stops = [free.completion_ids[0, 2].item(), free.completion_ids[2, 5].item()]  # rows end at different steps
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        s = sample(model, tokenizer, prompts, temperature=0, max_new_tokens=10, stop_token_ids=stops)
    finally:
        hook.remove()
    lengths = s.completion_lengths.tolist()
    assert len(set(lengths)) > 1, "the test needs rows that stop at different steps"
    decode_rows = [w[0] for w in widths[1:]]  # after the prefill: one forward per new column
    assert decode_rows == sorted(decode_rows, reverse=True) and decode_rows[-1] < len(prompts)
    assert sum(decode_rows) + len(prompts) == sum(lengths)  # every decoded position is a real token
    for i, p in enumerate(prompts):
        alone = sample(model, tokenizer, [p], temperature=0, max_new_tokens=10, stop_token_ids=stops)
        assert s.completions()[i] == alone.completions()[0]
        assert torch.allclose(s.logprobs[i, :lengths[i]], alone.logprobs[0, :lengths[i]], atol=1e-5)
    monkeypatch.setattr(sampling, "_select_rows", lambda cache, keep: False)
    kept = sample(model, tokenizer, prompts, temperature=0, max_new_tokens=10, stop_token_ids=stops)
    assert torch.equal(kept.completion_ids, s.completion_ids) and torch.equal(kept.completion_mask, s.completion_mask)
    assert torch.allclose(kept.logprobs, s.logprobs, atol=1e-5) and kept.finish_reason == s.finish_reason


def test_the_copies_of_a_prompt_share_one_prefill(model, tokenizer):
    """With n > 1 each distinct prompt is encoded once (the prefill forward sees len(prompts) rows) and its cache
    is copied to its n rows; greedy rows of one prompt are then identical and equal the prompt sampled once."""
    prompts = encode(tokenizer)
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        s = sample(model, tokenizer, prompts, n=3, temperature=0, max_new_tokens=6, batch_size=12)
    finally:
        hook.remove()
    assert widths[0][0] == len(prompts) and widths[1] == (12, 1)
    once = sample(model, tokenizer, prompts, n=1, temperature=0, max_new_tokens=6)
    for i in range(len(prompts)):
        for k in range(3):
            assert s.completions()[3 * i + k] == once.completions()[i]
            assert torch.allclose(s.logprobs[3 * i + k], once.logprobs[i, :s.logprobs.shape[1]], atol=1e-5)

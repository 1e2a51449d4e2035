"""Loss masks, hand-checked as decoded text: every mode × template, single/multi-turn, turns all/last."""

import pytest

from tunelab.data import masking
from tunelab.data.formats import Sample
from tunelab.data.masking import encode, encode_dataset
from tunelab.data.templates import ALPACA_PREAMBLE, Segment, get_template
from tunelab.errors import TunelabError

SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "the answer"}]
MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "the answer"}]
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def trained_text(tok, enc):
    return tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m], skip_special_tokens=False)


def run(tok, template, messages, mode="prompt", turns="all", max_length=None):
    segs = get_template(template, tok).segments(messages)
    return encode(tok, segs, mode=mode, turns=turns, max_length=max_length)


# (template, messages, mode, turns) -> exactly the text the loss trains on.
CASES = [
    # --- prompt mode: response + end-of-turn of trained assistant turns
    ("chatml", SINGLE, "prompt", "all", "the answer<|im_end|>"),
    ("tokenizer", SINGLE, "prompt", "all", "the answer<|im_end|>"),
    ("alpaca", SINGLE, "prompt", "all", "the answer<|im_end|>"),
    ("llama3", SINGLE, "prompt", "all", "the answer<|eot_id|>"),
    ("phi3", SINGLE, "prompt", "all", "the answer<|end|>"),
    ("mistral", SINGLE, "prompt", "all", " the answer<|im_end|>"),  # " the" glues the separator space
    ("chatml", MULTI, "prompt", "all", "Hello!<|im_end|>the answer<|im_end|>"),
    ("chatml", MULTI, "prompt", "last", "the answer<|im_end|>"),
    ("tokenizer", MULTI, "prompt", "all", "Hello!<|im_end|>the answer<|im_end|>"),
    ("tokenizer", MULTI, "prompt", "last", "the answer<|im_end|>"),
    ("alpaca", MULTI, "prompt", "all", "Hello!<|im_end|>the answer<|im_end|>"),
    ("alpaca", MULTI, "prompt", "last", "the answer<|im_end|>"),
    # SmolLM2's BPE merges the "><" of "<|eot_id|><|start_header_id|>" into one token; it starts inside the
    # eot, so it is trained (the model must emit ">" to finish "<|eot_id|>").
    ("llama3", MULTI, "prompt", "all", "Hello!<|eot_id|><the answer<|eot_id|>"),
    ("llama3", MULTI, "prompt", "last", "the answer<|eot_id|>"),
    # --- template mode: prompt + response + eot; boilerplate (headers, injected system prompt) masked
    ("chatml", SINGLE, "template", "all", "What is 2+2?the answer<|im_end|>"),
    ("tokenizer", SINGLE, "template", "all", "What is 2+2?the answer<|im_end|>"),
    ("alpaca", SINGLE, "template", "all", "What is 2+2?the answer<|im_end|>"),
    # same BPE effect: "?<" is one token starting in the prompt
    ("llama3", SINGLE, "template", "all", "What is 2+2?<the answer<|eot_id|>"),
    ("chatml", MULTI, "template", "all", "Be brief.HiHello!<|im_end|>2+2?the answer<|im_end|>"),
    # turns=last makes earlier answers prompt — still trained in template mode
    ("chatml", MULTI, "template", "last", "Be brief.HiHello!<|im_end|>2+2?the answer<|im_end|>"),
    # --- none mode: everything but special tokens; the trained eot is kept. Token 0 is never a target.
    ("chatml", SINGLE, "none", "all", "user\nWhat is 2+2?\nassistant\nthe answer<|im_end|>\n"),
    ("tokenizer", SINGLE, "none", "all",
     f"system\n{SMOL_SYSTEM}\nuser\nWhat is 2+2?\nassistant\nthe answer<|im_end|>\n"),
    ("alpaca", SINGLE, "none", "all",
     ALPACA_PREAMBLE[len("Below"):] + "\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\nthe answer<|im_end|>"),
    # llama3 markers are plain text to SmolLM2 (not special), so they are trained; token 0 is "<|"
    ("llama3", SINGLE, "none", "all", "|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?"
     "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nthe answer<|eot_id|>"),
    ("chatml", MULTI, "none", "all",
     "system\nBe brief.\nuser\nHi\nassistant\nHello!<|im_end|>\nuser\n2+2?\nassistant\nthe answer<|im_end|>\n"),
    # the first answer's <|im_end|> is prompt now, hence a masked special token
    ("chatml", MULTI, "none", "last",
     "system\nBe brief.\nuser\nHi\nassistant\nHello!\nuser\n2+2?\nassistant\nthe answer<|im_end|>\n"),
    ("tokenizer", MULTI, "none", "last",
     "system\nBe brief.\nuser\nHi\nassistant\nHello!\nuser\n2+2?\nassistant\nthe answer<|im_end|>\n"),
]


@pytest.mark.parametrize("template, messages, mode, turns, expected", CASES,
                         ids=[f"{c[0]}-{'multi' if c[1] is MULTI else 'single'}-{c[2]}-{c[3]}" for c in CASES])
def test_trained_text(tokenizer, template, messages, mode, turns, expected):
    enc = run(tokenizer, template, messages, mode, turns)
    assert trained_text(tokenizer, enc) == expected
    assert enc.n_trained == sum(enc.loss_mask) and not enc.truncated
    assert enc.loss_mask[0] is False
    # ids are the single tokenization of the full rendering — nothing added, nothing split differently
    t = get_template(template, tokenizer)
    full = t.render(t.prepare(messages))
    assert enc.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]


def test_none_mode_masks_every_special_token_except_trained_eot(tokenizer):
    enc = run(tokenizer, "chatml", MULTI, "none", "all")
    special = set(tokenizer.all_special_ids)
    trained_special = [tokenizer.convert_ids_to_tokens(i) for i, m in zip(enc.input_ids, enc.loss_mask)
                       if m and i in special]
    assert trained_special == ["<|im_end|>", "<|im_end|>"]  # the two assistant eots, no <|im_start|>


def test_truncation_keeps_the_left_part(tokenizer):
    full = run(tokenizer, "chatml", SINGLE)
    cut = run(tokenizer, "chatml", SINGLE, max_length=len(full.input_ids) - 3)
    assert cut.truncated and cut.input_ids == full.input_ids[:-3] and cut.loss_mask == full.loss_mask[:-3]
    assert trained_text(tokenizer, cut) == "the"  # " answer", "<|im_end|>" and "\n" were cut


def test_text_sample_trains_everything_and_appends_eos(tokenizer):
    enc = encode(tokenizer, [Segment("Once upon a time", "text", 0)], mode="prompt")
    ids = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == ids + [tokenizer.eos_token_id]  # SmolLM2 adds no bos by itself: none prepended
    assert enc.loss_mask == [False] + [True] * len(ids)
    assert trained_text(tokenizer, enc) == " upon a time<|im_end|>"


def test_text_sample_gets_bos_when_the_tokenizer_adds_one(tokenizer, monkeypatch):
    monkeypatch.setattr(masking, "adds_bos", lambda tok: True)  # a Llama-style tokenizer
    enc = encode(tokenizer, [Segment("Once upon a time", "text", 0)], mode="none")
    assert enc.input_ids[0] == tokenizer.bos_token_id and enc.input_ids[-1] == tokenizer.eos_token_id
    assert enc.loss_mask[0] is False and all(enc.loss_mask[1:])


# Not llama3 here: with SmolLM2's BPE its header's "\n\n" is one token at the end of a generation prompt but
# "\n", "\n" before "the" inside a conversation — same text, one token more (a tokenizer artefact).
@pytest.mark.parametrize("template", ["chatml", "tokenizer", "mistral", "alpaca"])
@pytest.mark.parametrize("turns", ["all", "last"])
def test_prompt_span_is_the_generation_prompt_in_every_mode(tokenizer, template, turns):
    """`prompt_mask` marks the tokens generation is given for the (first / last) trained answer, whatever the
    loss trains on; plain text has none."""
    tmpl = get_template(template, tokenizer)
    upto = MULTI[:2] if turns == "all" else MULTI[:4]
    want = tokenizer(tmpl.generation_prompt(upto), add_special_tokens=False)["input_ids"]
    for mode in masking.MODES:
        enc = run(tokenizer, template, MULTI, mode=mode, turns=turns)
        n = sum(enc.prompt_mask)
        assert enc.prompt_mask == [i < n for i in range(len(enc))] and enc.input_ids[:n] == want, mode
    assert not any(encode(tokenizer, [Segment("Once upon a time", "text", 0)]).prompt_mask)


def test_bad_mode_and_turns(tokenizer):
    segs = get_template("chatml", tokenizer).segments(SINGLE)
    with pytest.raises(TunelabError, match="unknown loss mask mode 'everything' \\(choose prompt, none, template\\)"):
        encode(tokenizer, segs, mode="everything")
    with pytest.raises(TunelabError, match="unknown turns 'first' \\(choose all, last\\)"):
        encode(tokenizer, segs, turns="first")


def _samples():
    long_prompt = "word " * 60
    return [Sample(SINGLE, None, "d.jsonl:1"),
            Sample([{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "ok"}], None,
                   "d.jsonl:2"),
            Sample(None, "Plain text for pretraining.", "d.jsonl:3"),
            Sample([{"role": "user", "content": "Repeat"}, {"role": "assistant", "content": long_prompt}], None,
                   "d.jsonl:4")]


def test_encode_dataset_drops_and_counts_fully_masked(tokenizer):
    examples, stats = encode_dataset(tokenizer, _samples(), get_template("chatml", tokenizer), max_length=40)
    # example 2's answer lies beyond 40 tokens: nothing to train on, dropped and reported
    assert [e.origin for e in examples] == ["d.jsonl:1", "d.jsonl:3", "d.jsonl:4"]
    assert stats.n_fully_masked == 1 and stats.dropped == ["d.jsonl:2"]
    assert stats.n_examples == 3 and stats.n_truncated == 1 and examples[2].truncated
    assert len(examples[2]) == 40 and examples[2].n_trained > 0
    assert stats.total_tokens == sum(len(e) for e in examples)
    assert stats.trained_tokens == sum(e.n_trained for e in examples)
    assert stats.as_dict() == {"n_examples": 3, "n_truncated": 1, "n_fully_masked": 1,
                               "total_tokens": stats.total_tokens, "trained_tokens": stats.trained_tokens}


def test_encode_dataset_without_max_length_keeps_all(tokenizer):
    examples, stats = encode_dataset(tokenizer, _samples(), get_template("chatml", tokenizer), batch_size=3)
    assert stats.n_examples == 4 and stats.n_truncated == 0 and stats.n_fully_masked == 0
    one_by_one = [encode(tokenizer, get_template("chatml", tokenizer).segments(s.messages)) for s in
                  (_samples()[0], _samples()[3])]
    assert [examples[0].input_ids, examples[3].input_ids] == [e.input_ids for e in one_by_one]
    assert [examples[0].loss_mask, examples[3].loss_mask] == [e.loss_mask for e in one_by_one]


def test_encode_dataset_every_example_fully_masked_is_an_error(tokenizer):
    with pytest.raises(TunelabError, match=r"all 2 examples are fully masked.*max_length=8"):
        encode_dataset(tokenizer, _samples()[:2], get_template("chatml", tokenizer), max_length=8)


def test_encode_dataset_template_error_names_the_record(tokenizer):
    from tunelab.data.templates import Template

    upper = Template("shouty", "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", {})
    with pytest.raises(TunelabError, match=r"^d\.jsonl:1: template 'shouty' transforms message content"):
        encode_dataset(tokenizer, _samples()[:1], upper)

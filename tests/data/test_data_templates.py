"""Built-in Jinja templates render the documented formats; segmentation of ANY template reproduces it exactly."""

import pytest

from tunelab.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT, Template, get_template
from tunelab.errors import TunelabError

SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "the answer"}]
MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "the answer"}]
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ALL = ("tokenizer", "alpaca", "chatml", "llama3", "phi3", "mistral")


def kinds(segs):
    return [(s.kind, s.text) for s in segs]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_segments_concatenate_to_the_real_rendering(tokenizer, name, messages):
    t = get_template(name, tokenizer)
    segs = t.segments(messages)
    assert "".join(s.text for s in segs) == t.render(t.prepare(messages))
    responses = [s.text for s in segs if s.kind == "response"]
    assert responses == [m["content"] for m in messages if m["role"] == "assistant"]
    assert len([s for s in segs if s.kind == "eot"]) == len(responses)


@pytest.mark.parametrize("name", ALL)
def test_our_rendering_equals_transformers_apply_chat_template(tokenizer, name):
    """Template.jinja saved as a tokenizer's chat_template renders identically through transformers."""
    t = get_template(name, tokenizer)
    for gen in (False, True):
        msgs = t.prepare(MULTI if gen is False else MULTI[:4])
        hf = tokenizer.apply_chat_template(msgs, chat_template=t.jinja, tokenize=False, add_generation_prompt=gen)
        assert t.render(msgs, add_generation_prompt=gen) == hf


def test_tokenizer_template_injected_system_prompt_is_boilerplate(tokenizer):
    t = get_template("auto", tokenizer)
    assert t.name == "tokenizer" and t.jinja == tokenizer.chat_template
    assert kinds(t.segments(SINGLE)) == [
        ("boilerplate", f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n"),
        ("prompt", "What is 2+2?"),
        ("boilerplate", "<|im_end|>\n<|im_start|>assistant\n"),
        ("response", "the answer"),
        ("eot", "<|im_end|>"),
        ("boilerplate", "\n"),
    ]


def test_chatml_multi_turn_segments_and_turn_indices(tokenizer):
    segs = get_template("chatml", tokenizer).segments(MULTI)
    assert [(s.kind, s.turn, s.text) for s in segs] == [
        ("boilerplate", 0, "<|im_start|>system\n"), ("prompt", 0, "Be brief."),
        ("boilerplate", 1, "<|im_end|>\n<|im_start|>user\n"), ("prompt", 1, "Hi"),
        ("boilerplate", 2, "<|im_end|>\n<|im_start|>assistant\n"), ("response", 2, "Hello!"), ("eot", 2, "<|im_end|>"),
        ("boilerplate", 3, "\n<|im_start|>user\n"), ("prompt", 3, "2+2?"),
        ("boilerplate", 4, "<|im_end|>\n<|im_start|>assistant\n"), ("response", 4, "the answer"),
        ("eot", 4, "<|im_end|>"), ("boilerplate", 4, "\n"),
    ]


def test_alpaca_renders_the_stanford_prompt_with_eos(tokenizer):
    t = get_template("alpaca", tokenizer)
    assert t.render(SINGLE) == (f"{ALPACA_PREAMBLE}\n\n### Instruction:\nWhat is 2+2?\n\n"
                                "### Response:\nthe answer<|im_end|>")
    with_input = [{"role": "user", "content": "Translate"}, {"role": "input", "content": "chat"},
                  {"role": "assistant", "content": "cat"}]
    assert t.render(with_input) == (f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\nTranslate\n\n"
                                    "### Input:\nchat\n\n### Response:\ncat<|im_end|>")
    assert kinds(t.segments(with_input)) == [
        ("boilerplate", f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n"), ("prompt", "Translate"),
        ("boilerplate", "\n\n### Input:\n"), ("prompt", "chat"), ("boilerplate", "\n\n### Response:\n"),
        ("response", "cat"), ("eot", "<|im_end|>")]
    assert t.generation_prompt(with_input[:2]).endswith("### Input:\nchat\n\n### Response:\n")
    assert "Write a response" in ALPACA_PREAMBLE and ALPACA_PREAMBLE_INPUT.count("input") == 1


def test_input_role_is_folded_into_the_user_turn_for_chat_templates(tokenizer):
    t = get_template("chatml", tokenizer)
    msgs = [{"role": "user", "content": "Translate"}, {"role": "input", "content": "chat"},
            {"role": "assistant", "content": "cat"}]
    assert t.render(t.prepare(msgs)) == ("<|im_start|>user\nTranslate\n\nchat<|im_end|>\n"
                                         "<|im_start|>assistant\ncat<|im_end|>\n")


def test_llama3_phi3_mistral_exact_renderings(tokenizer):
    assert get_template("llama3", tokenizer).render(SINGLE) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nthe answer<|eot_id|>")
    assert get_template("phi3", tokenizer).render(SINGLE) == (
        "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\nthe answer<|end|>\n")
    # mistral uses the tokenizer's bos/eos (SmolLM2: <|im_start|>, <|im_end|>) and folds system into user
    assert get_template("mistral", tokenizer).render(MULTI) == (
        "<|im_start|>[INST] Be brief.\n\nHi [/INST] Hello!<|im_end|>[INST] 2+2? [/INST] the answer<|im_end|>")
    assert get_template("llama3", tokenizer).stop_strings == ["<|eot_id|>"]
    assert get_template("phi3", tokenizer).stop_strings == ["<|end|>"]


@pytest.mark.parametrize("name, header", [
    ("chatml", "<|im_start|>assistant\n"), ("tokenizer", "<|im_start|>assistant\n"),
    ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n"), ("phi3", "<|assistant|>\n"),
    ("alpaca", "### Response:\n"), ("mistral", "[/INST]")])
def test_generation_prompt_ends_with_the_assistant_header(tokenizer, name, header):
    prompt = get_template(name, tokenizer).generation_prompt(SINGLE[:1])
    assert prompt.endswith(header) and "What is 2+2?" in prompt


def test_unknown_template_lists_choices(tokenizer):
    with pytest.raises(TunelabError, match="unknown template 'vicuna' \\(choose auto, tokenizer, alpaca, chatml"):
        get_template("vicuna", tokenizer)


class _NoTemplateTokenizer:
    chat_template = None
    special_tokens_map = {"eos_token": "</s>"}


def test_tokenizer_without_template_auto_falls_back_to_chatml():
    assert get_template("auto", _NoTemplateTokenizer()).name == "chatml"
    with pytest.raises(TunelabError, match="this tokenizer has no chat template"):
        get_template("tokenizer", _NoTemplateTokenizer())


def test_template_that_transforms_content_is_refused_by_name():
    upper = Template("shouty", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}", {})
    with pytest.raises(TunelabError, match="template 'shouty' transforms message content"):
        upper.segments(SINGLE)


def test_template_that_trims_content_is_handled():
    trim = Template("trimmy", "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | trim }}[end]{% endfor %}",
                    {})
    segs = trim.segments([{"role": "user", "content": "  q  "}, {"role": "assistant", "content": " a\n"}])
    assert kinds(segs) == [("boilerplate", "[user]"), ("prompt", "q"), ("boilerplate", "[end][assistant]"),
                           ("response", "a"), ("eot", "[end]")]


def test_template_that_drops_a_message_or_raises_is_reported():
    no_system = Template("nosys", "{% for m in messages %}{% if m['role'] != 'system' %}"
                                  "{{ m['content'] }}|{% endif %}{% endfor %}", {})
    with pytest.raises(TunelabError, match=r"template 'nosys' transforms message content \(message 0 \(role system\) "
                                           "is not rendered"):
        no_system.segments(MULTI)
    strict = Template("strict", "{{ raise_exception('roles must alternate') }}", {})
    with pytest.raises(TunelabError, match="template 'strict': roles must alternate"):
        strict.segments(SINGLE)


def test_sentinel_like_content_does_not_confuse_segmentation(tokenizer):
    t = get_template("chatml", tokenizer)
    tricky = [{"role": "user", "content": t._tag + "0\u27e7"}, {"role": "assistant", "content": "ok"}]
    segs = t.segments(tricky)
    assert [s.text for s in segs if s.kind == "prompt"] == [tricky[0]["content"]]

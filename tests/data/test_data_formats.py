"""Format detection and conversion of raw records to Samples, with file:line errors."""

import pytest

from tunelab.data.formats import detect_format, to_sample
from tunelab.data.sources import Record
from tunelab.errors import TunelabError


def rec(data, origin="data.jsonl:7"):
    return Record(data, origin)


@pytest.mark.parametrize("data, fmt", [
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"messages": []}, "messages"),
    ({"conversations": []}, "messages"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"text": "t"}, "text"),
    ({"messages": [], "text": "t"}, "messages"),  # messages wins over a stray text column
])
def test_detect_format(data, fmt):
    assert detect_format(rec(data)) == fmt


def test_detect_format_unknown_keys_names_the_record():
    with pytest.raises(TunelabError, match=r"^data\.jsonl:7: cannot tell the data format from the keys \['q'"):
        detect_format(rec({"q": 1, "r": 2}))


def test_alpaca_with_and_without_input():
    s = to_sample(rec({"instruction": "Translate", "input": "chat", "output": "cat"}))
    assert s.messages == [{"role": "user", "content": "Translate"}, {"role": "input", "content": "chat"},
                          {"role": "assistant", "content": "cat"}]
    assert s.text is None and s.origin == "data.jsonl:7"
    for empty in ({"input": ""}, {"input": None}, {}):
        s = to_sample(rec({"instruction": "Say hi", "output": "hi", **empty}))
        assert [m["role"] for m in s.messages] == ["user", "assistant"]


def test_messages_multi_turn_and_sharegpt():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    assert to_sample(rec({"messages": msgs})).messages == msgs
    share = [{"from": "system", "value": "s"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]
    assert to_sample(rec({"conversations": share})).messages == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def test_prompt_completion_string_and_conversational():
    assert to_sample(rec({"prompt": "p", "completion": "c"})).messages == [
        {"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    s = to_sample(rec({"prompt": [{"role": "user", "content": "p"}],
                       "completion": [{"role": "assistant", "content": "c"}]}))
    assert [m["role"] for m in s.messages] == ["user", "assistant"]


def test_text():
    s = to_sample(rec({"text": "Once upon a time"}))
    assert s.messages is None and s.text == "Once upon a time"


@pytest.mark.parametrize("data, fmt, message", [
    ({"instruction": "i"}, "auto", "data.jsonl:7: missing field 'output' (alpaca format)"),
    ({"instruction": "i", "output": 3}, "auto",
     "data.jsonl:7: field 'output' must be a string, got int (alpaca format)"),
    ({"instruction": ["i"], "output": "o"}, "auto", "data.jsonl:7: field 'instruction' must be a string, got list"),
    ({"prompt": "p"}, "auto", "data.jsonl:7: missing field 'completion' (prompt_completion format)"),
    ({"text": "  "}, "auto", "data.jsonl:7: field 'text' is empty (text format)"),
    ({"text": 5}, "auto", "data.jsonl:7: field 'text' must be a string, got int (text format)"),
    ({"messages": []}, "auto", "data.jsonl:7: field 'messages' is empty (no messages)"),
    ({"messages": "hi"}, "auto", "data.jsonl:7: field 'messages' must be a list of messages, got str"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "robot", "content": "a"}]}, "auto",
     "data.jsonl:7: field 'messages': message 1 has unknown role 'robot' (expected system, user, input, assistant)"),
    ({"messages": [{"role": "user", "content": 1}]}, "auto",
     "data.jsonl:7: field 'messages': message 0 content must be a string, got int"),
    ({"messages": [{"role": "user"}]}, "auto", "data.jsonl:7: field 'messages': message 0 has no 'content'"),
    ({"messages": [{"content": "x"}]}, "auto", "data.jsonl:7: field 'messages': message 0 has no 'role'"),
    ({"messages": ["hi"]}, "auto", "data.jsonl:7: field 'messages': message 0 must be an object, got str"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "auto",
     "data.jsonl:7: conversation has no assistant turn, so nothing to train on"),
    # a format override that does not fit the record
    ({"prompt": "p", "completion": "c"}, "alpaca", "data.jsonl:7: missing field 'instruction' (alpaca format)"),
    ({"instruction": "i", "output": "o"}, "text", "data.jsonl:7: missing field 'text' (text format)"),
    ({"text": "t"}, "messages", "data.jsonl:7: missing field 'messages' (messages format)"),
    ({"text": "t"}, "sharegpt", "unknown data format 'sharegpt' (choose auto, alpaca, messages"),
])
def test_bad_records_raise_with_origin(data, fmt, message):
    with pytest.raises(TunelabError) as e:
        to_sample(rec(data), fmt)
    assert str(e.value).startswith(message)


def test_prompt_only_conversation_allowed_when_not_required():
    s = to_sample(rec({"messages": [{"role": "user", "content": "q"}]}), require_assistant=False)
    assert s.messages == [{"role": "user", "content": "q"}]

"""Turn raw records into `Sample`s: a conversation (list of role/content messages) or a plain text.

Recognised formats (`detect_format` picks the first that matches the record's keys, in this order):

``messages``           ``{"messages": [{"role": "user", "content": "..."}, ...]}`` — multi-turn chat. Also the
                       ShareGPT style ``{"conversations": [{"from": "human", "value": "..."}, ...]}``
                       (``human``→user, ``gpt``→assistant). Roles: system, user, input, assistant.
``alpaca``             ``{"instruction", "input"?, "output"}`` (Stanford Alpaca, Taori et al. 2023) →
                       ``[user: instruction, input: input (only if non-empty), assistant: output]``.
``prompt_completion``  ``{"prompt", "completion"}`` (or ``"response"`` for ``"completion"``) →
                       ``[user: prompt, assistant: completion]``; either side may also be a list of messages
                       (the conversational form TRL uses).
``text``               ``{"text": "..."}`` — continued pretraining: every token is trained. A ``.txt`` file is
                       one such record, marked as a whole document (`Sample.document`).

Columns named otherwise are renamed first (``data.columns``, `columns.rename_columns`).

Every problem raises `TunelabError` prefixed with the record's origin, e.g.
``data.jsonl:7: missing field 'output' (alpaca format)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TunelabError
from .sources import Record

FORMATS = ("alpaca", "messages", "prompt_completion", "text")
ROLES = ("system", "user", "input", "assistant")
# ShareGPT and friends name roles differently; map them onto ours.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "model": "assistant",
                 "bot": "assistant"}


@dataclass
class Sample:
    """A chat (`messages`, each ``{"role", "content"}``) or a plain `text`; exactly one is set."""

    messages: list[dict] | None
    text: str | None
    origin: str
    document: bool = False  # a whole document (a .txt file): split into max_length chunks, never truncated


def detect_format(record: Record | dict) -> str:
    """Name the format of a record from its keys (see the module docstring for the order)."""
    data, origin = (record.data, record.origin) if isinstance(record, Record) else (record, "record")
    keys = set(data)
    if keys & {"messages", "conversations"}:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if "prompt" in keys and (keys & {"completion", "response"} or not keys & {"chosen", "rejected"}):
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise TunelabError(
        f"{origin}: cannot tell the data format from the keys {sorted(keys)}; expected alpaca "
        "(instruction, input?, output), messages (messages or conversations), prompt_completion "
        "(prompt, completion) or text (text)")


def to_sample(record: Record, fmt: str = "auto", require_assistant: bool = True) -> Sample:
    """Convert one record to a `Sample` in format `fmt` (``"auto"`` detects it per record).

    `require_assistant` (on for SFT) rejects a conversation with no assistant turn, which would have nothing
    to learn from.
    """
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt not in FORMATS:
        raise TunelabError(f"unknown data format '{fmt}' (choose auto, {', '.join(FORMATS)})")
    origin = record.origin
    if fmt == "text":
        text = _field(record, "text", fmt)
        if not text.strip():
            raise TunelabError(f"{origin}: field 'text' is empty (text format)")
        return Sample(None, text, origin, document=record.document)
    if fmt == "alpaca":
        messages = [{"role": "user", "content": _field(record, "instruction", fmt)}]
        extra = _field(record, "input", fmt, optional=True)
        if extra:  # an empty input means "no input": the Stanford template switches preamble on this
            messages.append({"role": "input", "content": extra})
        messages.append({"role": "assistant", "content": _field(record, "output", fmt)})
    elif fmt == "prompt_completion":
        answer = "response" if "response" in record.data and "completion" not in record.data else "completion"
        messages = (_side(record, "prompt", "user", fmt) + _side(record, answer, "assistant", fmt))
    else:
        key = "messages" if "messages" in record.data else "conversations"
        if key not in record.data:
            raise TunelabError(f"{origin}: missing field 'messages' (messages format)")
        messages = chat_messages(record.data[key], f"{origin}: field '{key}'")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise TunelabError(f"{origin}: conversation has no assistant turn, so nothing to train on")
    return Sample(messages, None, origin)


def _field(record: Record, key: str, fmt: str, optional: bool = False) -> str:
    value = record.data.get(key)
    if value is None:  # absent, JSON null, or an empty parquet/CSV cell
        if optional:
            return ""
        raise TunelabError(f"{record.origin}: missing field '{key}' ({fmt} format)")
    if not isinstance(value, str):
        raise TunelabError(f"{record.origin}: field '{key}' must be a string, got "
                           f"{type(value).__name__} ({fmt} format)")
    return value


def _side(record: Record, key: str, role: str, fmt: str) -> list[dict]:
    """One side of a prompt/completion pair: a string (one message of `role`) or a list of messages."""
    value = record.data.get(key)
    if isinstance(value, list):
        return chat_messages(value, f"{record.origin}: field '{key}'")
    return [{"role": role, "content": _field(record, key, fmt)}]


def chat_messages(raw, where: str) -> list[dict]:
    """Validate and normalise a message list (role/content or ShareGPT from/value)."""
    if not isinstance(raw, list):
        raise TunelabError(f"{where} must be a list of messages, got {type(raw).__name__}")
    if not raw:
        raise TunelabError(f"{where} is empty (no messages)")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise TunelabError(f"{where}: message {i} must be an object, got {type(msg).__name__}")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if role is None:
            raise TunelabError(f"{where}: message {i} has no 'role' (or ShareGPT 'from')")
        if content is None:
            raise TunelabError(f"{where}: message {i} has no 'content' (or ShareGPT 'value')")
        if not isinstance(content, str):
            raise TunelabError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
        role = _ROLE_ALIASES.get(str(role).lower(), str(role).lower())
        if role not in ROLES:
            raise TunelabError(f"{where}: message {i} has unknown role '{msg.get('role', msg.get('from'))}' "
                               f"(expected {', '.join(ROLES)})")
        out.append({"role": role, "content": content})
    return out


def prompt_of(record: Record, fmt: str = "auto") -> list[dict]:
    """The conversation a model is prompted with: the record's messages up to its answer (trailing assistant
    turns — the reference answer — removed). Evaluation (`eval.exact`) and RL prompts both use it."""
    if fmt in ("auto", "prompt_completion") and "prompt" in record.data and "completion" not in record.data \
            and not set(record.data) & {"chosen", "rejected", "messages", "instruction"}:
        return _side(record, "prompt", "user", "prompt_completion")  # a prompt-only record (RL prompts)
    sample = to_sample(record, fmt, require_assistant=False)
    if sample.text is not None:
        raise TunelabError(f"{record.origin}: a prompt needs instruction/prompt/messages fields, not plain text")
    messages = list(sample.messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise TunelabError(f"{record.origin}: nothing left to prompt with after removing the answer")
    return messages

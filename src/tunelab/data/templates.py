"""Chat templates, and splitting a rendered conversation into typed segments — by rendering, not searching.

Every template is a Jinja chat template (the format Hugging Face tokenizers ship as ``chat_template``), so the
one that trained a model can be saved with the run (`Template.jinja`) and generation later uses the same text.

**Segmentation.** Loss masking needs to know which characters of the rendered text are the assistant's answer,
which are the user's prompt, and which are template boilerplate. Searching for marker strings (``"<|im_start|>
assistant"``) breaks on every template it was not written for, so instead we *ask the template*:

1. Render the conversation with each message's content replaced by a unique sentinel. Whatever lies between
   sentinels is text the template produced itself (role headers, injected default system prompts…).
2. For each assistant message *i*, render the prefix ``messages[:i+1]``. The text the template emits right
   after the sentinel in that prefix, and which also follows it in the full rendering, is how the template
   *closes* an assistant turn. Its part up to the last non-whitespace character is the end-of-turn (``eot``,
   e.g. ``<|im_end|>``) — what the model must learn to emit so generation stops; the trailing whitespace and
   the next header are ``boilerplate`` (never generated: decoding stops at the eot).
3. Substitute the real contents back and check that the concatenation equals the real rendering *exactly*.
   Templates that ``| trim`` contents are handled by retrying with stripped contents; a template that
   transforms content in any other way raises `TunelabError` naming it.

Segment kinds: ``boilerplate``, ``prompt`` (system/user/input content), ``response`` (assistant content),
``eot`` and ``text`` (plain pretraining text). ``Segment.turn`` is the index of the message the segment belongs
to (boilerplate belongs to the message whose header it opens; trailing boilerplate to the last message).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from ..errors import TunelabError

TEMPLATES = ("auto", "tokenizer", "alpaca", "chatml", "llama3", "phi3", "mistral")

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.")

# Built-ins written as Jinja so they can be saved as a tokenizer's chat_template. Whitespace control (`-`)
# everywhere: the only output is what the `{{ }}` expressions emit.
BUILTIN_JINJA = {
    "chatml": (
        "{%- for m in messages -%}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"),
    "llama3": (
        "{{- '<|begin_of_text|>' -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
        "{%- endif -%}"),
    "phi3": (
        "{%- for m in messages -%}"
        "{{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"),
    # Mistral has no system role: the system text is prepended to the first user turn.
    "mistral": (
        "{{- bos_token -}}"
        "{%- set ns = namespace(system='') -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\\n\\n' -%}"
        "{%- elif m['role'] == 'user' -%}{{- '[INST] ' + ns.system + m['content'] + ' [/INST]' -}}"
        "{%- set ns.system = '' -%}"
        "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + eos_token -}}"
        "{%- else -%}{{- raise_exception('mistral template: unsupported role ' + m['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"),
    # Stanford Alpaca prompt. A system message replaces the preamble; the preamble mentions the input only
    # when there is one. Turns after the first are separated by a blank line.
    "alpaca": (
        "{%- set ns = namespace(has_input=false, has_system=false) -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'input' -%}{%- set ns.has_input = true -%}{%- endif -%}"
        "{%- if m['role'] == 'system' -%}{%- set ns.has_system = true -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if not ns.has_system -%}"
        "{%- if ns.has_input -%}{{- '" + ALPACA_PREAMBLE_INPUT + "\\n\\n' -}}"
        "{%- else -%}{{- '" + ALPACA_PREAMBLE + "\\n\\n' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{{- m['content'] + '\\n\\n' -}}"
        "{%- elif m['role'] == 'user' -%}{{- '### Instruction:\\n' + m['content'] + '\\n\\n' -}}"
        "{%- elif m['role'] == 'input' -%}{{- '### Input:\\n' + m['content'] + '\\n\\n' -}}"
        "{%- elif m['role'] == 'assistant' -%}{{- '### Response:\\n' + m['content'] + eos_token -}}"
        "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}"
        "{%- else -%}{{- raise_exception('alpaca template: unsupported role ' + m['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"),
}

_KIND = {"system": "prompt", "user": "prompt", "input": "prompt", "assistant": "response"}


@dataclass
class Segment:
    """A span of rendered text: `kind` in boilerplate|prompt|response|eot|text, `turn` = message index."""

    text: str
    kind: str
    turn: int


@lru_cache(maxsize=64)
def _compile(source: str):
    """Compile a chat template with the same Jinja settings Hugging Face uses, so renderings match."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Template:
    """A named Jinja chat template bound to a tokenizer's special-token strings."""

    def __init__(self, name: str, jinja: str, special_tokens: dict[str, str]):
        self.name = name
        self.jinja = jinja
        self._vars = dict(special_tokens)
        # Only alpaca has an "input" role; other templates get the input appended to the user message.
        self.input_role = name == "alpaca"
        self._compiled = _compile(jinja)
        # Unique per template instance and unlikely in any real data; checked against the contents anyway.
        self._tag = f"\u27e6tl{os.getpid()}x{id(self):x}#"

    def __repr__(self):
        return f"Template({self.name!r})"

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The exact text this template produces for `messages`."""
        from jinja2.exceptions import TemplateError

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._vars)
        except TemplateError as e:
            raise TunelabError(f"template '{self.name}': {e}") from None
        except (TypeError, KeyError, IndexError, AttributeError) as e:  # template code choking on our input
            raise TunelabError(f"template '{self.name}' failed to render: {type(e).__name__}: {e}") from None

    def prepare(self, messages: list[dict]) -> list[dict]:
        """Messages as this template expects them: ``input`` folded into the preceding user turn if needed."""
        out: list[dict] = []
        for m in messages:
            m = {"role": m["role"], "content": m["content"]}
            if m["role"] == "input" and not self.input_role:
                if out and out[-1]["role"] == "user":
                    out[-1]["content"] += "\n\n" + m["content"]
                    continue
                m["role"] = "user"
            out.append(m)
        return out

    def generation_prompt(self, messages: list[dict]) -> str:
        """Text to feed a model so it writes the next assistant turn (ends with the assistant header)."""
        return self.render(self.prepare(messages), add_generation_prompt=True)

    @property
    def stop_strings(self) -> list[str]:
        """The assistant end-of-turn text(s) — useful as generation stop strings for non-special markers."""
        segs = self.segments([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
        return [s.text for s in segs if s.kind == "eot"]

    def segments(self, messages: list[dict]) -> list[Segment]:
        """Split the rendering of `messages` into typed segments whose texts concatenate to it exactly."""
        msgs = self.prepare(messages)
        full = self.render(msgs)
        tries = [msgs]
        if any(m["content"] != m["content"].strip() for m in msgs):
            tries.append([{**m, "content": m["content"].strip()} for m in msgs])  # templates that `| trim`
        why = "the content it renders differs from the message"
        for candidate in tries:
            segs = self._split(candidate)
            if isinstance(segs, str):
                why = segs
            elif "".join(s.text for s in segs) == full:
                return [s for s in segs if s.text]
        raise TunelabError(f"template '{self.name}' transforms message content ({why}), so its rendering cannot "
                           "be split into prompt/response spans; pick another template (e.g. chatml)")

    def _split(self, msgs: list[dict]) -> list[Segment] | str:
        """Segments from sentinel renderings (see module docstring), or why a message could not be located."""
        tag = self._tag
        while any(tag in m["content"] for m in msgs):
            tag += "#"
        marks = [f"{tag}{i}\u27e7" for i in range(len(msgs))]
        masked = [{**m, "content": marks[i]} for i, m in enumerate(msgs)]
        rendered = self.render(masked)
        spans, cursor = [], 0
        for i, mark in enumerate(marks):
            start = rendered.find(mark, cursor)
            if start < 0 or rendered.count(mark) != 1:
                return f"message {i} (role {msgs[i]['role']}) is not rendered verbatim exactly once, in order"
            spans.append((start, start + len(mark)))
            cursor = start + len(mark)
        segs: list[Segment] = []
        prev_end = 0
        for i, m in enumerate(msgs + [None]):
            gap = rendered[prev_end: spans[i][0] if m is not None else len(rendered)]
            owner = i if m is not None else len(msgs) - 1
            if i > 0 and msgs[i - 1]["role"] == "assistant":
                eot = self._eot(masked, i - 1, gap)
                segs.append(Segment(eot, "eot", i - 1))
                gap = gap[len(eot):]
            segs.append(Segment(gap, "boilerplate", owner))
            if m is not None:
                segs.append(Segment(m["content"], _KIND.get(m["role"], "prompt"), i))
                prev_end = spans[i][1]
        return segs

    def _eot(self, masked: list[dict], i: int, gap: str) -> str:
        """End-of-turn text of assistant message `i`: how the template closes the turn, minus trailing space."""
        prefix = self.render(masked[: i + 1])
        mark = masked[i]["content"]
        tail = prefix[prefix.index(mark) + len(mark):] if mark in prefix else ""
        n = 0
        while n < min(len(tail), len(gap)) and tail[n] == gap[n]:
            n += 1
        return gap[:n].rstrip()


def _special_tokens(tokenizer) -> dict[str, str]:
    special = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
               if isinstance(v, str)}
    # Built-ins reference bos/eos; a tokenizer without them renders them as empty strings, not "None".
    special.setdefault("bos_token", "")
    special.setdefault("eos_token", "")
    return special


def from_jinja(name: str, jinja: str, tokenizer) -> Template:
    """A template saved with a run (its name and Jinja source), bound to `tokenizer` again."""
    return Template(name, jinja, _special_tokens(tokenizer))


def get_template(name: str, tokenizer) -> Template:
    """Template `name` bound to `tokenizer`'s special tokens (``bos_token``, ``eos_token`` … in Jinja).

    ``auto`` is the tokenizer's own chat template when it has one, else ``chatml``; ``tokenizer`` insists on
    the tokenizer's own.
    """
    special = _special_tokens(tokenizer)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # some tokenizers ship several named templates; "default" is the chat one
        own = own.get("default")
    if name == "auto":
        return Template("tokenizer", own, special) if own else Template("chatml", BUILTIN_JINJA["chatml"], special)
    if name == "tokenizer":
        if not own:
            raise TunelabError("template 'tokenizer': this tokenizer has no chat template "
                               f"(choose one of {', '.join(BUILTIN_JINJA)})")
        return Template("tokenizer", own, special)
    if name not in BUILTIN_JINJA:
        raise TunelabError(f"unknown template '{name}' (choose {', '.join(TEMPLATES)})")
    return Template(name, BUILTIN_JINJA[name], special)


def sample_segments(sample, template: Template) -> list[Segment]:
    """Segments of a `formats.Sample`: a chat through `template`, plain text as a single ``text`` segment."""
    if sample.text is not None:
        return [Segment(sample.text, "text", 0)]
    try:
        return template.segments(sample.messages)
    except TunelabError as e:
        raise TunelabError(f"{sample.origin}: {e}") from None

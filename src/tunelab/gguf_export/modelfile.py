"""The Ollama `Modelfile` written beside every exported GGUF: `ollama create NAME -f X.Modelfile` makes a model
that is prompted the way the run was trained.

Ollama formats a chat with a Go `text/template` (its `TEMPLATE`), not with the Jinja chat template the GGUF
carries, so the run's template is translated — for the turn formats Ollama's own library uses, recognised by
their special markers:

    chatml   <|im_start|>ROLE\\n … <|im_end|>\\n                 (SmolLM2, Qwen2/2.5/3, tunelab's `chatml`)
    llama3   <|start_header_id|>ROLE<|end_header_id|>\\n\\n … <|eot_id|>
    phi3     <|ROLE|>\\n … <|end|>\\n
    gemma    <start_of_turn>user\\n … <end_of_turn>\\n  (assistant = model; system text starts the first user turn)
    mistral  [INST] … [/INST] answer</s>                (system text starts the first user turn)

A family is a `Turns` spec (the text before and after each role's content). The same spec is rendered two ways:
as the Go template written to the Modelfile (`go_template`) and in Python (`Turns.render`), and the Python
rendering must equal the run's own Jinja rendering on probe conversations (system or not, one turn or several)
— so a template of a known family with other whitespace, or one that injects text the spec does not have
(Llama 3.1's "Cutting Knowledge Date" lines before a given system prompt) gets no TEMPLATE rather than a wrong
one. A default system prompt the run's template inserts when the conversation has none (SmolLM2's "You are a
helpful AI assistant named SmolLM…", Qwen2.5's) becomes `SYSTEM`: Ollama sends it whenever a chat has no system
message, as the template did. End-of-turn markers become `PARAMETER stop`.

Without a TEMPLATE line Ollama takes the chat template from the GGUF's metadata (`tokenizer.chat_template`,
which tunelab writes: the run's template) and matches it against the templates it knows; the Modelfile says so
in a comment. The leading BOS a template writes (`<|begin_of_text|>`, `<s>`) is not part of TEMPLATE when the
GGUF says `tokenizer.ggml.add_bos_token` (llama.cpp adds it then, as Ollama's own templates assume); when it
does not, the rendering must match with the BOS text in it, which no family has, so there is no TEMPLATE.

The Go template is written on one line of literal text and actions, without `{{-`/`-}}` trimming, so every
newline in it is one the prompt contains (a trim marker would also eat a newline that belongs to a turn).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import TunelabError


@dataclass(frozen=True)
class Turns:
    """A chat format as the text around each role's content; `system=None`: the system text starts the first
    user turn's content, followed by `system_join`. `generation`: what ends a prompt for the model's answer
    (None: the assistant's header; Mistral's is nothing — the model writes the space before its answer)."""

    name: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    system: tuple[str, str] | None
    stops: tuple[str, ...]
    system_join: str = "\n\n"
    generation: str | None = None

    @property
    def prompt_end(self) -> str:
        return self.assistant[0] if self.generation is None else self.generation

    def render(self, messages: list[dict], system: str = "") -> str:
        """What `go_template(self)` renders in Ollama for `messages` (system messages travel as `system`)."""
        out, first = [], True
        if system and self.system:
            out.append(self.system[0] + system + self.system[1])
        msgs = [m for m in messages if m["role"] != "system"]
        for i, m in enumerate(msgs):
            last = i == len(msgs) - 1
            if m["role"] == "user":
                lead = system + self.system_join if (system and first and self.system is None) else ""
                first = False
                out.append(self.user[0] + lead + m["content"] + self.user[1])
                if last:
                    out.append(self.prompt_end)
            elif m["role"] == "assistant":
                out.append(self.assistant[0] + m["content"] + ("" if last else self.assistant[1]))
        return "".join(out)


FAMILIES = {
    "chatml": Turns("chatml", ("<|im_start|>user\n", "<|im_end|>\n"), ("<|im_start|>assistant\n", "<|im_end|>\n"),
                    ("<|im_start|>system\n", "<|im_end|>\n"), ("<|im_end|>", "<|im_start|>")),
    "llama3": Turns("llama3", ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
                    ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
                    ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
                    ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    "phi3": Turns("phi3", ("<|user|>\n", "<|end|>\n"), ("<|assistant|>\n", "<|end|>\n"), ("<|system|>\n", "<|end|>\n"),
                  ("<|end|>", "<|user|>", "<|assistant|>")),
    "gemma": Turns("gemma", ("<start_of_turn>user\n", "<end_of_turn>\n"), ("<start_of_turn>model\n", "<end_of_turn>\n"),
                   None, ("<end_of_turn>", "<start_of_turn>")),
    "mistral": Turns("mistral", ("[INST] ", " [/INST]"), (" ", "</s>"), None, ("[INST]", "[/INST]", "</s>"),
                     generation=""),
}
# a family's markers, looked for in the Jinja source (first match wins)
MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"),
           ("<|assistant|>", "phi3"), ("[INST]", "mistral"))
PROBES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"},
     {"role": "user", "content": "And 4 + 4?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
     {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"}],
]


def _go(text: str) -> str:
    """Literal text for a Go template: `{{` cannot appear as text, so it is emitted by an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(t: Turns) -> str:
    """The Ollama TEMPLATE (Go text/template over .System and .Messages) that renders like `t.render`."""
    u0, u1 = map(_go, t.user)
    a0, a1 = map(_go, t.assistant)
    end = f"{{{{ if $last }}}}{_go(t.prompt_end)}{{{{ end }}}}" if t.prompt_end else ""
    lead = ""
    if t.system:
        head = f"{{{{ if .System }}}}{_go(t.system[0])}{{{{ .System }}}}{_go(t.system[1])}{{{{ end }}}}"
    else:  # the system text opens the first user turn
        head = "{{ $first := true }}"
        lead = (f"{{{{ if and $first $.System }}}}{{{{ $.System }}}}{_go(t.system_join)}{{{{ end }}}}"
                "{{ $first = false }}")
    return head + (
        '{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
        f'{{{{ if eq .Role "user" }}}}{u0}{lead}{{{{ .Content }}}}{u1}{end}'
        f'{{{{ else if eq .Role "assistant" }}}}{a0}{{{{ .Content }}}}{{{{ if not $last }}}}{a1}{{{{ end }}}}'
        '{{ end }}{{ end }}')


def _strip_bos(text: str, bos: str) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


def match_family(template, bos: str = "", eos: str = "") -> tuple[Turns | None, str, str]:
    """(family, default system prompt, why not) for a run's `Template`: the family whose rendering equals the
    template's on every probe conversation, or (None, "", the reason). `bos`: the BOS text llama.cpp adds itself
    (the GGUF says add_bos_token), so not part of TEMPLATE; "" when it adds none. `eos`: the tokenizer's EOS
    (Mistral's turns end with it)."""
    jinja = template.jinja or ""
    name = next((fam for marker, fam in MARKERS if marker in jinja), None)
    if name is None:
        return None, "", "its markers are not those of a known chat format"
    turns = FAMILIES[name]
    if name == "mistral" and eos:
        turns = replace(turns, assistant=(" ", eos), stops=("[INST]", "[/INST]", eos))
    try:
        render = [_strip_bos(template.render(p, add_generation_prompt=True), bos) for p in PROBES]
    except TunelabError as e:
        return None, "", f"it does not render the probe conversations ({e})"
    default = ""
    if turns.system and render[0].startswith(turns.system[0]) and turns.render(PROBES[0]) != render[0]:
        body = render[0][len(turns.system[0]):]
        end = body.find(turns.system[1])
        default = body[:end] if end > 0 else ""
    for probe, want in zip(PROBES, render):
        system = next((m["content"] for m in probe if m["role"] == "system"), default)
        if turns.render(probe, system) != want:
            return None, "", f"it looks like {name} but renders differently (e.g. {want[:60]!r}…)"
    return turns, default, ""


def ollama_name(stem: str) -> str:
    """A model name Ollama accepts, from the GGUF's file name (lowercase letters, digits, . _ -)."""
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"


def modelfile_path(gguf_path: Path) -> Path:
    """`X.Modelfile` beside `X.gguf` (one per GGUF, so exports of several types in one folder keep theirs)."""
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def _quote(text: str) -> str:
    if '"""' in text:
        raise TunelabError('gguf export: the chat template text contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(gguf_path: Path, template, bos: str = "", eos: str = "") -> str:
    """The Modelfile for `gguf_path` prompted with the run's `Template` (see the module docstring)."""
    turns, default, why = match_family(template, bos, eos)
    source = f"./{gguf_path.name}"
    if re.search(r'\s|"', source):
        if '"' in source:
            raise TunelabError(f'gguf export: {gguf_path.name}: a file name with " cannot be named in a Modelfile')
        source = f'"{source}"'  # Ollama's Modelfile parser reads a quoted value whole
    lines = [f"# Ollama model for {gguf_path.name}, exported by tunelab: ollama create {ollama_name(gguf_path.stem)} "
             f"-f {shlex.quote(modelfile_path(gguf_path).name)}", f"FROM {source}"]
    if turns is None:
        lines.append(f"# No TEMPLATE: the run's chat template ({template.name}) is not written here because {why}; "
                     "Ollama reads it from the GGUF metadata (tokenizer.chat_template).")
        try:
            stops = list(dict.fromkeys(s for s in template.stop_strings if s.strip()))
        except TunelabError:
            stops = []
    else:
        lines.append(f"# the run's chat template ({template.name}) as Ollama's Go template: the {turns.name} format")
        lines.append(f"TEMPLATE {_quote(go_template(turns))}")
        if default:
            lines.append(f"SYSTEM {_quote(default)}")
        stops = list(turns.stops)
    lines += [f'PARAMETER stop "{s}"' for s in stops if '"' not in s and "\n" not in s]
    return "\n".join(lines) + "\n"

"""The Ollama Modelfile beside each GGUF (tunelab.gguf_export.modelfile): TEMPLATE in Ollama's Go-template syntax
for the run's chat template when it is a known family, PARAMETER stop for its end-of-turn markers, SYSTEM for a
default system prompt the template inserts, a comment and no TEMPLATE otherwise. Where Go is installed, Go's own
text/template (what Ollama runs) renders the written TEMPLATE to exactly the run's Jinja rendering."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_gguf_export import CHATML, _model_dir, bpe_tokenizer  # noqa: F401  (fixture)
from tunelab.cli import main
from tunelab.data.templates import BUILTIN_JINJA, from_jinja
from tunelab.gguf_export.modelfile import FAMILIES, PROBES, go_template, match_family, modelfile_text

CHATML_GO = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
             '{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
             '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
             '{{ if $last }}<|im_start|>assistant\n{{ end }}'
             '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}'
             '{{ if not $last }}<|im_end|>\n{{ end }}{{ end }}{{ end }}')
GEMMA = ("{{ bos_token }}{%- set ns = namespace(sys='') -%}{%- for m in messages -%}"
         "{%- if m['role'] == 'system' -%}{%- set ns.sys = m['content'] + '\\n\\n' -%}{%- else -%}"
         "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' + "
         "(ns.sys if m['role'] == 'user' else '') + m['content'] + '<end_of_turn>\\n' }}"
         "{%- if m['role'] == 'user' -%}{%- set ns.sys = '' -%}{%- endif -%}{%- endif -%}{%- endfor -%}"
         "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")
# Llama 3.1's template: a system block with knowledge-cutoff lines always, before any given system prompt
LLAMA31 = ("{{- bos_token }}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
           "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
           "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- set messages = messages[1:] %}"
           "{%- endif %}{{- '<|eot_id|>' }}{%- for m in messages %}"
           "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
           "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
           "{%- endif %}")


def _lines(text, key):
    return [ln for ln in text.splitlines() if ln.startswith(key)]


def test_chatml_with_smollm2s_default_system_prompt(tokenizer):
    """SmolLM2's own template (ChatML, a default system prompt when the chat has none)."""
    template = from_jinja("tokenizer", tokenizer.chat_template, tokenizer)
    text = modelfile_text(Path("out/SmolLM run.gguf"), template)
    assert text.splitlines()[:2] == [
        "# Ollama model for SmolLM run.gguf, exported by tunelab: ollama create smollm-run -f 'SmolLM run.Modelfile'",
        'FROM "./SmolLM run.gguf"']
    assert f'TEMPLATE """{CHATML_GO}"""' in text
    assert _lines(text, "SYSTEM") == [
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""']
    assert _lines(text, "PARAMETER") == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']


def test_llama3_template_and_stops(tokenizer):
    template = from_jinja("llama3", BUILTIN_JINJA["llama3"], tokenizer)
    text = modelfile_text(Path("m.gguf"), template, bos="<|begin_of_text|>")  # llama.cpp adds the BOS
    template_line = text[text.index('TEMPLATE """'):text.index('"""\n', text.index('TEMPLATE'))]
    assert "<|begin_of_text|>" not in template_line
    assert ("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
            in template_line)
    assert ('{{ if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
            '{{ if $last }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}') in template_line
    assert _lines(text, "SYSTEM") == []  # the template inserts no system prompt of its own
    assert _lines(text, "PARAMETER") == ['PARAMETER stop "<|eot_id|>"', 'PARAMETER stop "<|start_header_id|>"',
                                         'PARAMETER stop "<|end_header_id|>"']
    # a tokenizer that adds no BOS: the template's literal <|begin_of_text|> would be lost, so no TEMPLATE
    assert "TEMPLATE" not in "\n".join(ln for ln in modelfile_text(Path("m.gguf"), template).splitlines()
                                       if not ln.startswith("#"))


@pytest.mark.parametrize("name,jinja", [("alpaca", BUILTIN_JINJA["alpaca"]), ("llama31", LLAMA31)])
def test_unknown_or_unmatched_template_has_no_template_line(tokenizer, name, jinja):
    template = from_jinja(name, jinja, tokenizer)
    text = modelfile_text(Path("m.gguf"), template, bos=tokenizer.bos_token)
    assert not _lines(text, "TEMPLATE") and not _lines(text, "SYSTEM")
    comment = _lines(text, "# No TEMPLATE")
    assert len(comment) == 1 and comment[0].endswith(
        "Ollama reads it from the GGUF metadata (tokenizer.chat_template).")
    assert ("not those of a known chat format" if name == "alpaca" else "looks like llama3 but renders differently") \
        in comment[0]


@pytest.mark.parametrize("name,jinja,bos", [
    ("chatml", BUILTIN_JINJA["chatml"], ""), ("llama3", BUILTIN_JINJA["llama3"], "<|begin_of_text|>"),
    ("phi3", BUILTIN_JINJA["phi3"], ""), ("mistral", BUILTIN_JINJA["mistral"], "<|im_start|>"),
    ("gemma", GEMMA, "<|im_start|>")])
def test_families_match_the_builtin_templates(tokenizer, name, jinja, bos):
    """Each family's turn spec renders every probe conversation exactly as the Jinja template (less the BOS)."""
    turns, default, why = match_family(from_jinja(name, jinja, tokenizer), bos=bos, eos=tokenizer.eos_token)
    assert turns is not None and turns.name == name and default == "", why


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Renders an Ollama TEMPLATE with Go's text/template over Ollama's values (.System, .Messages of
    Role/Content), as `ollama run` does. Skipped without Go."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go): the Go-template check needs it")
    folder = tmp_path_factory.mktemp("gotemplate")
    (folder / "main.go").write_text(GO_PROGRAM)
    env = {"HOME": str(folder), "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"),
           "PATH": "/usr/bin:/bin", "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True, env=env,
                   capture_output=True)

    def render(template: str, system: str, messages: list[dict]) -> str:
        done = subprocess.run([str(folder / "render")], input=json.dumps(
            {"template": template, "system": system, "messages": messages}), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return render


GO_PROGRAM = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string     `json:"template"`
		System   string     `json:"system"`
		Messages []*Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"System": in.System, "Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.parametrize("name,jinja,bos", [
    ("chatml", BUILTIN_JINJA["chatml"], ""), ("llama3", BUILTIN_JINJA["llama3"], "<|begin_of_text|>"),
    ("phi3", BUILTIN_JINJA["phi3"], ""), ("mistral", BUILTIN_JINJA["mistral"], "<|im_start|>"),
    ("gemma", GEMMA, "<|im_start|>"), ("smollm2", None, "")])
def test_go_renders_the_template_as_the_run_does(tokenizer, go_render, name, jinja, bos):
    """Go's text/template on the written TEMPLATE (system messages passed as Ollama does: in .Messages and
    collected into .System; the Modelfile's SYSTEM when the chat has none) = the run's Jinja rendering."""
    template = from_jinja(name, jinja or tokenizer.chat_template, tokenizer)
    turns, default, _ = match_family(template, bos=bos, eos=tokenizer.eos_token)
    go = go_template(turns)
    for probe in PROBES + [[{"role": "user", "content": "{{ .System }} and {{ braces }}"}]]:
        want = template.render(probe, add_generation_prompt=True)
        want = want[len(bos):] if bos else want
        system = next((m["content"] for m in probe if m["role"] == "system"), default)
        assert go_render(go, system, probe) == want == turns.render(probe, system), probe


def test_cli_export_writes_the_modelfile_beside_the_gguf(tmp_path, bpe_tokenizer, capsys):
    src = _model_dir(tmp_path / "m", bpe_tokenizer, "llama")  # its template: CHATML, no default system prompt
    assert bpe_tokenizer.chat_template == CHATML
    out = tmp_path / "exports" / "tiny-q8_0.gguf"
    assert main(["export", str(src), "--gguf", str(out), "--type", "q8_0"]) == 0
    text = (out.parent / "tiny-q8_0.Modelfile").read_text()
    assert "FROM ./tiny-q8_0.gguf\n" in text and f'TEMPLATE """{CHATML_GO}"""' in text and "SYSTEM" not in text
    assert f"ollama create tiny-q8_0 -f {out.parent / 'tiny-q8_0.Modelfile'}" in capsys.readouterr().out
    # a Modelfile the user wrote there is not replaced without --overwrite, and nothing is exported
    out.unlink()
    (out.parent / "tiny-q8_0.Modelfile").write_text("FROM mine\n")
    assert main(["export", str(src), "--gguf", str(out), "--type", "q8_0"]) == 2
    assert "tiny-q8_0.Modelfile: exists and was not written by tunelab" in capsys.readouterr().err
    assert not out.exists() and (out.parent / "tiny-q8_0.Modelfile").read_text() == "FROM mine\n"

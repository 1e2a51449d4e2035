"""`data inspect` view: trained tokens visibly marked, counts, and a JSON form; plus the one-call pipeline."""

import json

from rich.console import Console
from rich.panel import Panel

from tunelab.data.inspect import TRAINED_STYLE, examples_json, inspect_examples, render_examples
from tunelab.data.pipeline import build_examples


def _data(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "What is 2+2?", "output": "the answer"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
            {"text": "Some plain text."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return build_examples(str(path), tokenizer, template="chatml")


def test_build_examples_end_to_end(tmp_path, tokenizer):
    examples, stats, template = _data(tmp_path, tokenizer)
    assert template.name == "chatml"
    assert [e.origin for e in examples] == [f"{tmp_path}/d.jsonl:{i}" for i in (1, 2, 3)]
    assert stats.n_examples == 3 and stats.n_fully_masked == 0
    first = examples[0]
    trained = tokenizer.decode([i for i, m in zip(first.input_ids, first.loss_mask) if m])
    assert trained == "the answer<|im_end|>"


def test_json_view(tmp_path, tokenizer):
    examples, _, _ = _data(tmp_path, tokenizer)
    data = examples_json(examples, tokenizer, n=2)
    assert len(data) == 2 and set(data[0]) == {"origin", "input_ids", "tokens", "loss"}
    first = data[0]
    assert first["input_ids"] == examples[0].input_ids and first["loss"] == examples[0].loss_mask
    assert "".join(first["tokens"]) == tokenizer.decode(examples[0].input_ids)
    assert "".join(t for t, m in zip(first["tokens"], first["loss"]) if m) == "the answer<|im_end|>"
    json.dumps(data)  # JSON-able


def test_rich_view_highlights_exactly_the_trained_tokens(tmp_path, tokenizer):
    examples, stats, _ = _data(tmp_path, tokenizer)
    group = render_examples(examples, tokenizer, n=1, stats=stats)
    legend, summary, panel = group.renderables
    assert "trained" in legend.plain and "masked" in legend.plain
    assert summary.plain.startswith(f"examples: 3   trained tokens: {stats.trained_tokens} / {stats.total_tokens}")
    assert "truncated: 0" in summary.plain and "fully masked (dropped): 0" in summary.plain
    assert isinstance(panel, Panel) and str(panel.title).endswith("d.jsonl:1 — 3/20 tokens trained")
    text = panel.renderable
    highlighted = "".join(text.plain[s.start:s.end] for s in text.spans if s.style == TRAINED_STYLE)
    assert highlighted == "the answer<|im_end|>"
    console = Console(record=True, width=120, force_terminal=True, color_system="truecolor")
    console.print(group)
    shown = console.export_text()
    assert "the answer<|im_end|>↵" in shown and "<|im_start|>assistant↵" in shown


def test_inspect_examples_prints_json_or_rich(tmp_path, tokenizer, capsys):
    examples, stats, _ = _data(tmp_path, tokenizer)
    out = inspect_examples(examples, tokenizer, n=2, stats=stats, as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed == out and len(out) == 2
    console = Console(record=True, width=100)
    inspect_examples(examples, tokenizer, n=1, stats=stats, console=console)
    assert "examples: 3" in console.export_text()


def test_without_a_terminal_trained_tokens_are_marked_in_text(tmp_path, tokenizer):
    """Piped or redirected there are no colours: trained spans are written between [[ and ]] instead."""
    examples, stats, _ = _data(tmp_path, tokenizer)
    group = render_examples(examples, tokenizer, n=2, stats=stats)
    piped = Console(record=True, width=200, force_terminal=False)
    piped.print(group)
    text = piped.export_text()
    assert "legend: [[trained]]  masked" in text
    lines = [line.strip("│ ") for line in text.splitlines()]
    assert "[[the answer<|im_end|>]]↵" in lines  # one span per run of trained tokens
    assert "[[Hello!<|im_end|>]]↵" in lines and "[[Hi" not in text and text.count("[[") == 2 + 2  # + the legend's two
    terminal = Console(record=True, width=200, force_terminal=True)
    terminal.print(group)
    assert "[[" not in terminal.export_text()  # on a terminal the colours say it


def test_cli_data_inspect_piped_marks_trained_tokens(tmp_path, tokenizer, capsys):
    from tests.helpers import save_tiny_model, write_config
    from tunelab.cli import main

    model = save_tiny_model(tmp_path / "m", tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "What is 2+2?", "output": "four"}) + "\n")
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "run"), model={"name": str(model)},
                       data={"train": str(data), "template": "chatml"})
    assert main(["data", "inspect", str(cfg), "--n", "1"]) == 0
    assert "[[four<|im_end|>]]" in capsys.readouterr().out

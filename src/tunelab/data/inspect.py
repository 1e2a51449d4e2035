"""Show exactly what the model will be trained on: every token, trained ones highlighted.

Masking bugs are silent — a wrong template or mode still trains, just on the wrong tokens — so `tunelab data
inspect` prints the first N encoded examples token by token: trained tokens (loss targets) on a green
background, masked ones dim, with a legend and dataset-wide counts; piped or redirected (no terminal, no
colours) the trained tokens are written between ``[[`` and ``]]``. ``--json`` emits the same information as
data for scripts: one object per example with ``origin``, ``input_ids``, ``tokens`` (each token decoded on its
own) and ``loss`` (one bool per token: is it a target).
"""

from __future__ import annotations

from .masking import DataStats, Encoded

TRAINED_STYLE = "black on green"
MASKED_STYLE = "dim"


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded on its own (a multi-byte character split across tokens shows as U+FFFD)."""
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def examples_json(examples: list[Encoded], tokenizer, n: int | None = None) -> list[dict]:
    """JSON-able view of the first `n` examples (all if None)."""
    chosen = examples if n is None else examples[:n]
    return [{"origin": ex.origin, "input_ids": list(ex.input_ids), "tokens": token_strings(tokenizer, ex.input_ids),
             "loss": [bool(m) for m in ex.loss_mask]} for ex in chosen]


def _summary(examples: list[Encoded], stats: DataStats | None) -> str:
    if stats is None:  # counts over what we were given
        total = sum(len(e) for e in examples)
        trained = sum(e.n_trained for e in examples)
        n, cut, dropped = len(examples), sum(e.truncated for e in examples), 0
    else:
        total, trained = stats.total_tokens, stats.trained_tokens
        n, cut, dropped = stats.n_examples, stats.n_truncated, stats.n_fully_masked
    share = f" ({100 * trained / total:.1f}%)" if total else ""
    return (f"examples: {n}   trained tokens: {trained} / {total}{share}   truncated: {cut}   "
            f"fully masked (dropped): {dropped}")


MARK_OPEN, MARK_CLOSE = "[[", "]]"  # trained spans without a terminal (piped, redirected): no colours to show them


def _marked_text():
    """`rich.text.Text` that shows its trained spans between ``[[`` and ``]]`` when printed to a console that is not
    a terminal (``tunelab data inspect … | less``, ``> file``), where a background colour would be lost and trained
    and masked tokens would read the same. On a terminal it prints as a plain `Text`; its `plain` and `spans` are
    those of the highlighted view either way."""
    from rich.text import Text

    class MarkedText(Text):
        legend_plain: str | None = None  # a legend: this text instead, without a terminal

        def __rich_console__(self, console, options):
            if console.is_terminal:
                yield from super().__rich_console__(console, options)
                return
            if self.legend_plain is not None:
                yield from Text(self.legend_plain).__rich_console__(console, options)
                return
            trained = sorted((s.start, s.end) for s in self.spans if s.style == TRAINED_STYLE)
            merged: list[list[int]] = []
            for start, end in trained:  # one [[…]] per run of consecutive trained tokens
                if merged and merged[-1][1] == start:
                    merged[-1][1] = end
                else:
                    merged.append([start, end])
            out, at = [], 0
            for start, end in merged:
                piece = self.plain[start:end]
                inner = piece.rstrip("\n")  # the closing mark before the line break a "↵" token ends with
                out += [self.plain[at:start], MARK_OPEN, inner, MARK_CLOSE, piece[len(inner):]]
                at = end
            out.append(self.plain[at:])
            yield from Text("".join(out)).__rich_console__(console, options)

    return MarkedText


def render_examples(examples: list[Encoded], tokenizer, n: int = 3, stats: DataStats | None = None):
    """A rich renderable: legend, counts, then the first `n` examples with trained tokens highlighted (between
    ``[[`` and ``]]`` when the console is not a terminal)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    MarkedText = _marked_text()
    legend = MarkedText.assemble(("legend: ", "bold"), ("trained", TRAINED_STYLE), "  ", ("masked", MASKED_STYLE),
                                 "  (↵ marks a newline inside a token)")
    legend.legend_plain = (f"legend: {MARK_OPEN}trained{MARK_CLOSE}  masked  (↵ marks a newline inside a token; "
                           "no terminal, so trained tokens are between [[ and ]])")
    parts = [legend, Text(_summary(examples, stats))]
    for ex in examples[:n]:
        body = MarkedText()
        for piece, trained in zip(token_strings(tokenizer, ex.input_ids), ex.loss_mask):
            # Make newlines visible (a trained "\n" would otherwise be an invisible highlight) but keep them.
            shown = piece.replace("\n", "↵\n")
            body.append(shown, style=TRAINED_STYLE if trained else MASKED_STYLE)
        body.rstrip()  # the final "↵\n" would otherwise leave an empty last line in the panel
        title = (f"{ex.origin or 'example'} — {ex.n_trained}/{len(ex)} tokens trained"
                 + (" — TRUNCATED" if ex.truncated else ""))
        parts.append(Panel(body, title=title, title_align="left"))
    return Group(*parts)


def inspect_examples(examples: list[Encoded], tokenizer, n: int = 3, stats: DataStats | None = None,
                     as_json: bool = False, console=None) -> list[dict]:
    """Print the first `n` examples (rich view, or JSON if `as_json`) and return their JSON-able view.

    `examples`/`stats` are what `masking.encode_dataset` returned, so this does not depend on the config.
    """
    import json

    data = examples_json(examples, tokenizer, n)
    if as_json:
        print(json.dumps(data, ensure_ascii=False))
    else:
        from rich.console import Console

        (console or Console()).print(render_examples(examples, tokenizer, n, stats))
    return data

"""The comparison report: a table (Markdown + CSV), figures (PNG) and one self-contained HTML page.

    report/
      index.html            everything in one file: table, figures (embedded as base64 PNG), per-run details
      results.md            the table, for pasting into notes or a pull request; for a study, its claims, budgets
                            and provenance first (`lab.study`)
      results.csv           the table at full precision, plus every task's base/final metric and any error
      curves.png  learning_forgetting.png  params.png   (each only when there is data for it)

The HTML page has no external references (no scripts, fonts or stylesheets to fetch), so it can be mailed,
archived or opened offline years later and still look the same. Every run-provided string is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from ..console import plural
from ..userfiles import check_can_create, check_replaceable, forget_written, make_folder, note_written, \
    write_file, written_by_tunelab
from .numbers import fmt, fmt_ci, kind_of
from .plots import pareto_front, plot_all, variant_points
from .results import RunInfo, applies, build_table, config_differences, flatten, to_csv, to_markdown
from .seeds import group_runs, has_seeds, variant_cell, variant_markdown, variant_table
from .study import study_html, study_markdown, study_parts

_CAPTIONS = {
    "curves": "Every series the runs logged against optimizer steps, one panel per kind (loss with held-out "
              "loss, reward, KL, entropy, learning rate, gradient norm, …); colour = run, line style = series. "
              "With seeds: the mean over seeds, shaded 95 % t band.",
    "learning_forgetting": "Learning (target tasks improved, higher is better) against forgetting (source tasks got "
                           "worse, lower is better). Ringed runs are on the Pareto front: no other run learns more "
                           "while forgetting less.",
    "params": "Learning, forgetting and final held-out loss against the number of trainable parameters (log "
              "scale); runs of the same method are joined.",
}

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
 color:#1d2330;padding:0 16px;line-height:1.45}
h1{margin-bottom:4px}.sub{color:#5b6475;margin-top:0}
table{border-collapse:collapse;font-size:13px;margin:8px 0 4px;display:block;overflow-x:auto}
th,td{border-bottom:1px solid #e3e6ec;padding:5px 8px;text-align:right;white-space:nowrap}
th{background:#f3f5f9;position:sticky;top:0}td.t,th.t{text-align:left}
tr.front td:first-child{font-weight:600}tr.front td:first-child::before{content:"★ ";color:#c48a00}
.pos{color:#137333}.neg{color:#b3261e}.failed{color:#b3261e;font-weight:600}
figure{margin:18px 0}figure img{max-width:100%;border:1px solid #e3e6ec;border-radius:6px}
figcaption{color:#5b6475;font-size:13px}
details{border:1px solid #e3e6ec;border-radius:6px;margin:8px 0;padding:6px 12px}
summary{cursor:pointer;font-weight:600}
pre{background:#f6f8fa;padding:8px;border-radius:4px;white-space:pre-wrap;word-break:break-word;
 max-height:260px;overflow:auto;font-size:12px}
.note{font-size:13px;color:#5b6475}.err{background:#fdecea;border-radius:4px;padding:6px 10px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:10px}
"""


FIGURES = ("curves", "learning_forgetting", "params")
REPORT_FILES = ("index.html", "results.md", "results.csv", *(f"{f}.png" for f in FIGURES))


def check_report_out(out: Path, overwrite: bool = False) -> None:
    """Refuse (one line) a report folder holding a file of the report's names that tunelab did not write, unless
    `overwrite` (`userfiles.check_replaceable`); writes nothing."""
    for name in REPORT_FILES:
        check_replaceable(Path(out) / name, "report --out", overwrite)


def build_report(runs: list[RunInfo], out_dir: str | Path, title: str = "tunelab report",
                 description: str = "", study: dict | None = None, overwrite: bool = False) -> Path:
    """Write the table, figures and index.html for `runs` into `out_dir`; returns index.html's path.

    `study`: a sweep's sweep.json (claims, match, configured budgets) — adds the verdicts, budgets, provenance.
    Everything is computed (figures drawn in a temporary folder) before any file is put in place, each file
    atomically, so a failure leaves the previous report as it was; a file of the report's names that tunelab did
    not write is refused unless `overwrite`."""
    out = Path(out_dir)
    check_report_out(out, overwrite)
    cols, rows = build_table(runs)
    verdicts = study_markdown(runs, study, title) + "\n"
    table = to_markdown(cols, rows)
    if has_seeds(runs):
        table = (f"Per variant, mean ± 95 % t half-width over its seeds:\n\n{variant_markdown(cols, rows, runs)}\n"
                 f"Per run:\n\n{table}")
    texts = {"results.md": f"# {title}\n\n{description}\n\n" + verdicts + table + _legend(runs),
             "results.csv": to_csv(cols, rows, runs)}
    make_folder(out, "report --out")
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-report-"))
    try:
        figures = plot_all(runs, stage)
        texts["index.html"] = render_html(runs, cols, rows, figures, title, description,
                                          study_html(study_parts(runs, study)))
        for name, text in texts.items():
            write_file(out / name, text, "report --out", overwrite)
        for name in FIGURES:
            target = out / f"{name}.png"
            if name in figures:
                os.replace(figures[name], target)
                note_written(target)
            elif written_by_tunelab(target):  # a figure that has no data this time must not linger
                forget_written(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out / "index.html"


def _legend(runs: list[RunInfo]) -> str:
    notes = ["", "learning ↑: mean relative improvement on the target tasks (positive = better); forgetting ↓: "
                 "mean relative worsening on the source tasks (positive = worse)."]
    fallback = [r.label for r in runs if r.scores["learning_from"] == "eval loss"]
    if fallback:
        notes.append("Runs without task evaluation (" + ", ".join(fallback) + "): learning = relative drop of the "
                     "held-out loss, (before − after) / before; forgetting unknown.")
    failed = [r for r in runs if r.status == "failed"]
    notes += [f"- **{r.label}** failed: {r.error}" for r in failed]
    return "\n".join(notes) + "\n"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def front_of(runs: list[RunInfo]) -> set[str]:
    """The variants on the Pareto front of (learning, forgetting) — means over seeds with seeds; empty with fewer
    than two variants that have both numbers (a front of one compares nothing)."""
    points = [(name, l[0], f[0]) for name, l, f in variant_points(runs) if l is not None and f is not None]
    if len(points) < 2:
        return set()
    return {points[i][0] for i in pareto_front([(l, f) for _, l, f in points])}


def render_html(runs: list[RunInfo], cols, rows, figures: dict[str, Path], title: str, description: str,
                study_section: str = "") -> str:
    front = front_of(runs)
    done = sum(r.status == "done" for r in runs)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f"<p class='sub'>{done} of {plural(len(runs), 'run')} finished · generated "
             f"{datetime.now().strftime('%Y-%m-%d %H:%M')} by tunelab</p>"]
    if description:
        parts.append(f"<p>{_e(description)}</p>")
    parts.append(_summary(runs, front))
    parts.append(study_section)
    if has_seeds(runs):
        parts.append("<h2>Variants</h2><p class='note'>Mean ± 95 % t half-width over each variant's seeds "
                     "(lab/stats.py).</p>" + _variant_table_html(cols, rows, runs, front))
    group = {r.label: g.name for g in group_runs(runs) for r in g.runs}
    parts.append("<h2>Results</h2>" + _table_html(cols, rows, {label for label, name in group.items()
                                                                if name in front}))
    parts.append("<p class='note'>" + _e(_legend(runs).strip().splitlines()[0])
                 + (" ★ = on the Pareto front. " if front else " ") + _fallback_note(runs) + "</p>")
    if figures:
        parts.append("<h2>Figures</h2>")
        for name, path in figures.items():
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            caption = _CAPTIONS.get(name, name)
            if name == "learning_forgetting" and not front:  # nothing ringed: no front among fewer than two
                caption = caption.split(" Ringed")[0]
            parts.append(f"<figure><img alt='{_e(name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
    if "learning_forgetting" not in figures:
        parts.append("<p class='note'>No learning-vs-forgetting figure: no run evaluated source tasks "
                     "(configure <code>eval: {target: [...], source: [...]}</code>).</p>")
    parts.append("<h2>Runs</h2>" + "".join(_run_details(r, runs) for r in runs))
    parts.append("</body></html>")
    return "\n".join(parts)


def _fallback_note(runs: list[RunInfo]) -> str:
    fb = [r.label for r in runs if r.scores["learning_from"] == "eval loss"]
    if not fb:
        return ""
    who = "all runs" if len(fb) == len(runs) else ", ".join(fb)
    return _e(f"Without task evaluation ({who}), learning is the relative drop of the held-out loss.")


def ranking_lines(runs: list[RunInfo]) -> list[str]:
    """"most learning: X (value)" and "least forgetting: Y (value)" (plain text) — only when at least two variants
    have the number: one run ranks against nothing. With seeds: variant means, ``± 95 % t half-width``."""
    points = variant_points(runs)
    lines = []
    for what, idx, pick in (("most learning", 1, max), ("least forgetting", 2, min)):
        scored = [(p[0], p[idx]) for p in points if p[idx] is not None]
        if len(scored) >= 2:
            name, s = pick(scored, key=lambda x: x[1][0])
            lines.append(f"{what}: {name} ({fmt_ci(*s, kind='signed')})")
    return lines


def _summary(runs: list[RunInfo], front: set[str]) -> str:
    items = []
    for line in ranking_lines(runs):
        what, rest = line.split(": ", 1)
        name, value = rest.rsplit(" (", 1)
        items.append(f"{_e(what)}: <b>{_e(name)}</b> ({_e(value[:-1])})")
    if front:
        items.append("Pareto front: " + ", ".join(f"<b>{_e(x)}</b>" for x in sorted(front)))
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        items.append(f"<span class='failed'>{len(failed)} failed</span>: "
                     + ", ".join(_e(r.label) for r in failed))
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>" if items else ""


def _cell_class(c, v) -> str:
    cls = "t" if c.kind == "text" else ""
    if isinstance(v, tuple):
        v = v[0]
    if c.kind == "signed" and isinstance(v, (int, float)) and v:
        good = v > 0 if not c.key.startswith("forget") else v < 0
        cls = "pos" if good else "neg"
    if c.key == "status" and v == "failed":
        cls = "t failed"
    return cls


def _table_html(cols, rows, front: set[str]) -> str:
    head = "".join(f"<th class='{'t' if c.kind == 'text' else ''}'>{_e(c.header)}</th>" for c in cols)
    body = []
    for row in rows:
        cells = [f"<td class='{_cell_class(c, row.get(c.key))}'>{_e(fmt(row.get(c.key), c.kind))}</td>"
                 for c in cols]
        tr = " class='front'" if row["variant"] in front else ""
        body.append(f"<tr{tr}>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _variant_table_html(cols, rows, runs: list[RunInfo], front: set[str]) -> str:
    vcols, vrows = variant_table(cols, rows, runs)
    head = "".join(f"<th class='{'t' if c.kind == 'text' else ''}'>{_e(c.header)}</th>" for c in vcols)
    body = []
    for row in vrows:
        cells = [f"<td class='{_cell_class(c, row.get(c.key))}'>{_e(variant_cell(row.get(c.key), c.kind))}</td>"
                 for c in vcols]
        tr = " class='front'" if row["variant"] in front else ""
        body.append(f"<tr{tr}>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _run_details(r: RunInfo, runs: list[RunInfo]) -> str:
    res = r.results or {}
    flat = flatten(r.config)
    diff = config_differences(runs)
    lines = [f"<details{' open' if r.status == 'failed' else ''}><summary>{_e(r.label)} "
             f"<span class='note'>· {_e(r.status)} · {_e(r.path)}</span></summary>"]
    if r.error:
        lines.append(f"<p class='err'>{_e(r.error)}</p>")
    if res.get("report"):
        lines.append(f"<p>{_e(res['report'])}</p>")
    if diff:
        lines.append("<p class='note'>" + " · ".join(f"{_e(k)} = {_e(flat.get(k))}" for k in diff
                                                 if applies(k, r.config)) + "</p>")
    ev = r.scores["eval"]
    if ev.get("final"):
        lines.append(_eval_table(ev))
    data = res.get("data") or {}
    if data:
        lines.append("<p class='note'>data: " + ", ".join(f"{_e(k)} {_e(v)}" for k, v in data.items()) + "</p>")
    for s in res.get("samples") or []:
        lines.append("<p class='note'>prompt</p><pre>" + _e(s.get("prompt", "")) + "</pre><div class='pair'>"
                     f"<div><p class='note'>before</p><pre>{_e(s.get('before', '—'))}</pre></div>"
                     f"<div><p class='note'>after</p><pre>{_e(s.get('after', '—'))}</pre></div></div>")
    if r.status == "done" and not res.get("samples"):
        lines.append("<p class='note'>no sample generations (samples.n_heldout: 0 and no samples.prompts)</p>")
    lines.append("</details>")
    return "\n".join(lines)


def _eval_table(ev: dict) -> str:
    """Per task and metric: base → final."""
    base, final = ev.get("base") or {}, ev.get("final") or {}
    rows = []
    for task, metrics in final.items():
        for m, v in (metrics or {}).items() if isinstance(metrics, dict) else ():
            b = (base.get(task) or {}).get(m) if isinstance(base.get(task), dict) else None
            rows.append(f"<tr><td class='t'>{_e(task)}</td><td class='t'>{_e(m)}</td>"
                        f"<td>{_e(fmt(b, kind_of(m)))}</td><td>{_e(fmt(v, kind_of(m)))}</td></tr>")
    return ("<table><thead><tr><th class='t'>task</th><th class='t'>metric</th><th>base</th><th>final</th></tr>"
            "</thead><tbody>" + "".join(rows) + "</tbody></table>")


def report_main(paths: list[str], out: str, markdown: str | None = None, overwrite: bool = False) -> int:
    """`tunelab report`: the report of run directories and/or sweep folders (one sweep keeps its title).

    `markdown`: instead, the study's generated README block (`lab.study`): ``"-"`` prints it, a file path
    replaces the block between its ``<!-- study:NAME -->`` markers. `overwrite`: replace report files in `out` that
    tunelab did not write."""
    from .results import collect, sweep_meta

    meta = sweep_meta(Path(paths[0])) if len(paths) == 1 else {}
    if markdown is not None:
        from .study import replace_block

        name = meta.get("name") or "report"
        block = study_markdown(collect(paths), meta, name, source=" ".join(paths))
        if markdown == "-":
            print(block, end="")
        else:
            replace_block(Path(markdown), name, block)
            print(f"{markdown}: study '{name}' section regenerated")
        return 0
    check_can_create(Path(out), "report --out")
    check_report_out(Path(out), overwrite)  # before reading every run
    runs = collect(paths)
    index = build_report(runs, out, title=meta.get("name") or "tunelab report",
                         description=meta.get("description") or "", study=meta, overwrite=overwrite)
    print(f"{plural(len(runs), 'run')}; report: {index}")
    return 0

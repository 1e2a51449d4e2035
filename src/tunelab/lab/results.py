"""Reading finished (or unfinished) runs back, and turning them into one comparison table.

A run directory is read through three files, any of which may be missing: ``config.yaml`` (what was asked),
``metrics.jsonl`` (the curves) and ``results.json`` (what came out). A sweep folder (with ``sweep.json``)
expands to its variants in sweep order, failed ones included, so the report shows what went wrong too; a
pipeline folder (``pipeline.yaml``, `train/pipeline.py`) expands to its stages in order, so one report shows each
stage's learning and forgetting.

**Learning and forgetting.** When a run evaluated tasks, ``results.json`` holds ``learning_score`` and
``forgetting_score`` (unitless: mean relative improvement on the target tasks, and mean relative worsening on
the source tasks — positive learning = the target improved, positive forgetting = the source got worse) and
per-task ``learning``/``forgetting`` deltas (`tunelab.eval.task_delta` dicts; the table shows each source
task's *worsening*, so every forgetting number reads the same way). Without them, learning falls back to the
relative drop of the held-out loss, ``(before − after) / before`` — the same sign convention — and forgetting
is unknown.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TunelabError
from ..jsonl import read_rows
from ..userfiles import read_text
from ..yamlfile import load_yaml
from .numbers import fmt

STATE_FILE = "sweep.json"
_NOT_A_DIFFERENCE = {"output_dir", "overwrite", "resume", "method"}  # method has its own column
MAX_DIFF_COLUMNS = 8


@dataclass
class RunInfo:
    label: str
    path: Path
    config: dict = field(default_factory=dict)
    results: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    status: str = "new"  # done | incomplete | failed | new
    error: str | None = None
    variant: str | None = None  # in a sweep with seeds: the variant's name (label = variant/seed-k)
    seed: int | None = None

    @property
    def train_rows(self) -> list[dict]:
        return [r for r in self.metrics if "loss" in r]

    @property
    def eval_rows(self) -> list[dict]:
        return [r for r in self.metrics if "loss" not in r and len(r) > 1]

    @property
    def scores(self) -> dict:
        return scores(self.results)


def flatten(node: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-4}}`` → ``{"train.lr": 1e-4}`` (lists stay values)."""
    out: dict = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_run_dir(p: Path) -> bool:
    return p.is_dir() and any((p / f).exists() for f in ("results.json", "config.yaml", "metrics.jsonl"))


def load_run(path: Path, label: str | None = None) -> RunInfo:
    """One run directory; unreadable lines of metrics.jsonl (a run killed mid-write) are skipped."""
    path = Path(path)
    info = RunInfo(label or path.name, path)
    for name in ("config.yaml", "pipeline.yaml"):  # a pipeline folder: its pipeline config
        if (path / name).exists():
            info.config = _mapping(load_yaml(read_text(path / name), str(path / name)), path / name)
            break
    if (path / "results.json").exists():
        file = path / "results.json"
        try:
            info.results = json.loads(read_text(file))
        except json.JSONDecodeError as e:  # written atomically since; an older run killed while writing it
            raise TunelabError(f"{file}:{e.lineno}: malformed JSON ({e.msg}); delete it to treat the run as "
                               "unfinished") from None
        except RecursionError:
            raise TunelabError(f"{file}: nested too deeply to be a tunelab results file") from None
        check_results(info.results, file)
    info.metrics = read_rows(path / "metrics.jsonl")
    info.status = "done" if info.results is not None else ("incomplete" if info.metrics or info.config else "new")
    return info


def _mapping(data, file: Path) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TunelabError(f"{file}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


# what the report reads from results.json, by type (tunelab writes exactly these; anything else is not its file)
_NUMBERS = ("steps", "trainable_params", "total_params", "eval_loss_before", "eval_loss_after", "tokens_per_s",
            "train_seconds", "total_seconds", "learning_score", "forgetting_score")
_TYPES = {**{k: (int, float) for k in _NUMBERS}, "method": (str,), "report": (str,), "eval": (dict,),
          "data": (dict,), "samples": (list,), "learning": (dict, int, float), "forgetting": (dict, int, float)}


def check_results(results, file: Path) -> None:
    """Refuse (one line naming the file and the field) a results.json whose fields the report reads have
    types tunelab never writes — edited by hand, or not a tunelab file."""
    if not isinstance(results, dict):
        raise TunelabError(f"{file}: expected a JSON object, got {_json_name(results)}; delete it to treat the run "
                           "as unfinished")
    for key, types in _TYPES.items():
        v = results.get(key)
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            raise TunelabError(f"{file}: '{key}' is {_json_name(v)}, expected "
                               f"{' or '.join(dict.fromkeys(_JSON_NAMES[t] for t in types))}")
    bad = [s for s in results.get("samples") or [] if not isinstance(s, dict)]
    if bad:
        raise TunelabError(f"{file}: 'samples' holds {_json_name(bad[0])}, expected objects")
    for phase in ("base", "final"):  # eval: {"base"|"final": {task: {metric: number}}, ...}
        tasks = (results.get("eval") or {}).get(phase)
        if tasks is not None and not (isinstance(tasks, dict) and all(isinstance(m, dict) or m is None
                                                                       for m in tasks.values())):
            raise TunelabError(f"{file}: 'eval.{phase}' is not an object of tasks, each an object of metrics")


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _json_name(v) -> str:
    return _JSON_NAMES.get(type(v), type(v).__name__)


def collect(paths) -> list[RunInfo]:
    """Runs from run directories and/or sweep folders, labels made unique."""
    runs: list[RunInfo] = []
    for p in map(Path, paths):
        if (p / STATE_FILE).exists():
            runs += _sweep_runs(p)
        elif (p / "pipeline.yaml").exists():
            runs += pipeline_runs(p)
        elif is_run_dir(p):
            runs.append(load_run(p))
        elif (p / "runs").is_dir():
            runs += [load_run(d) for d in sorted((p / "runs").iterdir()) if is_run_dir(d)]
        else:
            raise TunelabError(f"{p}: neither a run directory (config.yaml, metrics.jsonl, results.json) nor a "
                               "sweep folder (sweep.json)")
    seen: dict[str, int] = {}
    for r in runs:  # two runs named "run" from different folders: qualify with the parent folder
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.path.parent.name}/{r.label}"
    return runs


def sweep_meta(path: Path) -> dict:
    """name and description recorded in a sweep folder's sweep.json ({} when it is not a sweep folder)."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def pipeline_runs(folder: Path) -> list[RunInfo]:
    """The training stages of a pipeline folder (not its data stages), in pipeline order, labelled
    ``<pipeline>/<stage>``."""
    file = folder / "pipeline.yaml"
    stages = _mapping(load_yaml(read_text(file), str(file)), file).get("stages") or []
    if not isinstance(stages, list) or not all(isinstance(st, dict) for st in stages):
        raise TunelabError(f"{file}: stages: expected a list of mappings")
    names = [str(st.get("name", f"stage{i + 1}")) for i, st in enumerate(stages)
             if "generate" not in st]  # a data stage trains nothing: no run to report
    return [load_run(folder / n, f"{folder.name}/{n}") if is_run_dir(folder / n)
            else RunInfo(f"{folder.name}/{n}", folder / n) for n in names]


def _sweep_runs(folder: Path) -> list[RunInfo]:
    out = []
    for row in sweep_meta(folder).get("variants", []):
        rel = Path(row["run_dir"])  # the folder may have been moved since: keep only the part under runs/
        run_dir = folder / "runs" / (Path(rel.parent.name, rel.name) if row.get("seed") is not None else rel.name)
        info = load_run(run_dir, row["name"]) if is_run_dir(run_dir) else RunInfo(row["name"], run_dir)
        if row.get("status") == "failed" and info.status != "done":
            info.status, info.error = "failed", row.get("error")
        info.variant, info.seed = row.get("variant"), row.get("seed")
        out.append(info)
    return out


def delta_value(delta, worse_is_positive: bool = False) -> float | None:
    """A per-task delta as one number.

    tunelab's runs write `tunelab.eval.task_delta` dicts, whose ``improvement`` is > 0 when the task got *better*
    (and ``relative`` = improvement / |base|, None when the base is 0) — for source tasks too. Forgetting reads
    the other way (> 0 = worse), so ``worse_is_positive=True`` flips a dict's sign. A bare number is taken to be
    in the caller's convention already.
    """
    if isinstance(delta, bool):
        return None
    if isinstance(delta, (int, float)):
        return float(delta)
    if isinstance(delta, dict):
        for key in ("relative", "improvement"):
            v = delta.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return -float(v) if worse_is_positive else float(v)
    return None


def scores(results: dict | None) -> dict:
    """learning, forgetting (None when unknown), where learning came from, and per-task deltas."""
    r = results or {}
    learn_tasks = r.get("learning") if isinstance(r.get("learning"), dict) else {}
    forget_tasks = r.get("forgetting") if isinstance(r.get("forgetting"), dict) else {}
    learning = _num(r.get("learning_score"))
    if learning is None and not isinstance(r.get("learning"), dict):
        learning = _num(r.get("learning"))
    forgetting = _num(r.get("forgetting_score"))
    if forgetting is None and not isinstance(r.get("forgetting"), dict):
        forgetting = _num(r.get("forgetting"))
    source = "tasks" if learning is not None else None
    before, after = _num(r.get("eval_loss_before")), _num(r.get("eval_loss_after"))
    if learning is None and before and after is not None:
        learning, source = (before - after) / before, "eval loss"
    return {"learning": learning, "forgetting": forgetting, "learning_from": source,
            "learn": {t: delta_value(d) for t, d in learn_tasks.items()},
            "forget": {t: delta_value(d, worse_is_positive=True) for t, d in forget_tasks.items()},
            "eval": r.get("eval") if isinstance(r.get("eval"), dict) else {}}


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) else float(v)


@dataclass
class Column:
    key: str
    header: str
    kind: str = "float"  # a `lab.numbers` kind: text | int | float | loss | pct | percent | signed | params | seconds


def _own_sections() -> set[str]:
    """Sections that belong to one method or one objective (named like it), from the two registries."""
    from ..adapters.base import method_names
    from ..objectives import objective_names

    return set(method_names()) | set(objective_names())


def applies(key: str, config: dict, sections: set[str] | None = None) -> bool:
    """False for another method's or objective's options (``lora.r`` of a full-finetuning run, ``dpo.beta`` of a
    ppo run): shown as —, never a difference."""
    section = key.split(".")[0]
    return section not in (sections if sections is not None else _own_sections()) or \
        section in (config.get("method"), config.get("objective"))


def config_differences(runs: list[RunInfo]) -> list[str]:
    """Dotted config keys whose values differ between the runs they apply to (what the comparison is about)."""
    configs = [r.config for r in runs if r.config]
    if len(configs) < 2:
        return []
    sections = _own_sections()
    flat = [flatten(c) for c in configs]
    keys = {k for f in flat for k in f}
    diff = [k for k in keys if k.split(".")[0] not in _NOT_A_DIFFERENCE
            and len({json.dumps(f.get(k), sort_keys=True, default=str)
                     for f, c in zip(flat, configs) if applies(k, c, sections)}) > 1]
    first = list(flat[0])  # keep the config file's order, which groups keys by section
    diff.sort(key=lambda k: (first.index(k) if k in first else len(first), k))
    return diff[:MAX_DIFF_COLUMNS]


def build_table(runs: list[RunInfo]) -> tuple[list[Column], list[dict]]:
    """One row per run: what differs, parameters, losses, learning/forgetting (+ per task), speed."""
    diff = config_differences(runs)
    learn_tasks = sorted({t for r in runs for t in r.scores["learn"]})
    forget_tasks = sorted({t for r in runs for t in r.scores["forget"]})
    cols = [Column("variant", "variant", "text"), Column("status", "status", "text"),
            Column("method", "method", "text")]
    cols += [Column(f"cfg:{k}", k, "text") for k in diff]
    cols += [Column("trainable_params", "trainable params", "params"),
             Column("trainable_pct", "trainable %", "percent"),
             Column("eval_loss_before", "eval loss before", "loss"),
             Column("eval_loss_after", "eval loss after", "loss"),
             Column("learning", "learning ↑", "signed"), Column("forgetting", "forgetting ↓", "signed")]
    cols += [Column(f"learn:{t}", f"learn · {t}", "signed") for t in learn_tasks]
    cols += [Column(f"forget:{t}", f"forget · {t}", "signed") for t in forget_tasks]
    if any("mismatch_max_abs_logp" in (r.results or {}) for r in runs):  # online RL: sampler vs trainer
        cols += [Column("mismatch_kl", "mismatch KL", "reward"),
                 Column("mismatch_max_abs_logp", "mismatch max |Δ log p|", "reward")]
    cols += [Column("steps", "steps", "int"), Column("tokens_per_s", "tokens/s", "int"),
             Column("train_seconds", "train s", "seconds"), Column("total_seconds", "total s", "seconds")]
    rows = []
    for r in runs:
        res, s, flat = r.results or {}, r.scores, flatten(r.config)
        total = res.get("total_params")
        row = {"variant": r.label, "status": r.status, "method": res.get("method") or r.config.get("method"),
               "trainable_params": res.get("trainable_params"),
               "trainable_pct": 100.0 * res["trainable_params"] / total if total and res.get("trainable_params")
               is not None else None,
               "eval_loss_before": res.get("eval_loss_before"), "eval_loss_after": res.get("eval_loss_after"),
               "learning": s["learning"], "forgetting": s["forgetting"], "learning_from": s["learning_from"],
               **{f"cfg:{k}": _short_value(flat.get(k)) if applies(k, r.config) else None for k in diff},
               **{f"learn:{t}": v for t, v in s["learn"].items()},
               **{f"forget:{t}": v for t, v in s["forget"].items()},
               **{k: res.get(k) for k in ("steps", "tokens_per_s", "train_seconds", "total_seconds",
                                          "mismatch_kl", "mismatch_max_abs_logp")}}
        rows.append(row)
    return cols, rows


def _short_value(v) -> str:
    if isinstance(v, str) and "/" in v:
        return Path(v).name  # a data path: its file name is what tells variants apart
    return "—" if v is None else str(v) if not isinstance(v, list) else ",".join(map(str, v))


def to_markdown(cols: list[Column], rows: list[dict]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c.header) for c in cols) + " |"
    rule = "|" + "|".join("---:" if c.kind != "text" else "---" for c in cols) + "|"
    body = ["| " + " | ".join(cell(fmt(r.get(c.key), c.kind)) for c in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def to_csv(cols: list[Column], rows: list[dict], runs: list[RunInfo] | None = None) -> str:
    """Full-precision values; with `runs`, also every evaluated task's base and final metrics and the error."""
    extra: list[str] = []
    if runs:
        for r in runs:
            for phase in ("base", "final"):
                for task, metrics in (r.scores["eval"].get(phase) or {}).items():
                    for m in (metrics or {}) if isinstance(metrics, dict) else ():
                        key = f"{phase}:{task}:{m}"
                        if key not in extra:
                            extra.append(key)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([c.key for c in cols] + ["learning_from"] + extra + (["error"] if runs else []))
    for i, row in enumerate(rows):
        values = [row.get(c.key) for c in cols] + [row.get("learning_from")]
        if runs:
            ev = runs[i].scores["eval"]
            for key in extra:
                phase, task, m = key.split(":", 2)
                values.append(((ev.get(phase) or {}).get(task) or {}).get(m))
            values.append(runs[i].error)
        w.writerow(["" if v is None else v for v in values])
    return buf.getvalue()

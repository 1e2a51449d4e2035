"""Evaluation tasks: one small YAML file each, over a local JSONL (or .json/.csv/.parquet) file.

A task names its *kind* (how it is scored) and its data; everything else has a default. Bundled tasks live in
``tunelab/assets/tasks/*.yaml`` and are referred to by name (``gsm``); a user task is referred to by the path
of its YAML file (``my_tasks/trivia.yaml``). ``data`` is resolved relative to the YAML file's folder;
``${ASSETS}`` in it means tunelab's bundled assets folder, as in run configs (``data: ${ASSETS}/data/
verne_prose.jsonl``), so a task that reads bundled data works wherever the task file is copied.

Kinds and their fields (``*`` = required)::

    # every kind
    name: my_task            # default: the file name without .yaml
    kind*: perplexity | choice | exact | code
    data*: data/my.jsonl     # relative to this file
    description: "..."
    limit: 200               # default cap on records (the caller's `limit` overrides it)
    skip: 0                  # leave out the first `skip` records (e.g. the ones a training split used)
    batch_size: 8
    template: null           # null: the model's own template (the one passed in); or a name (chatml, ...)

    # kind: perplexity — mean token loss and perplexity = exp(mean token loss) over the loss tokens
    format: auto             # auto | alpaca | messages | prompt_completion | text   (see data/formats.py)
    masking: prompt          # prompt | none | template   (see data/masking.py; plain text trains everything)
    turns: all               # all | last
    max_length: 1024         # longer examples are cut (counted in the result's `truncated`)

    # kind: choice — log-likelihood of each choice after the prompt; acc and acc_norm
    prompt: "Question: {question}\\nAnswer:"   # str.format over the record's fields
    choices_field: choices   # a list of strings
    answer_field: answer     # index of the correct choice (or the correct choice's text)
    target_delimiter: " "    # put between prompt and choice (lm-eval's convention)
    chat: false              # true: the prompt becomes a user turn rendered with the template

    # kind: exact — greedy generation, answer extraction, exact match against `answer_field`
    prompt: null             # null: the record (via `format`) minus its final assistant turn is the prompt
    chat: true
    answer_field: answer
    extract: last_number     # gsm8k ("#### N") | last_number | regex | none (the whole output)
    regex: null              # for extract: regex — group 1 if the pattern has groups, else the whole match
    ignore_case: false
    max_new_tokens: 256
    stop: []                 # extra stop strings (the template's end-of-turn is always one in chat mode)

    # kind: code — HumanEval-format records (task_id, prompt, test, entry_point); pass@k in a sandbox
    chat: false              # false: the model continues the function; true: asked in a user turn
    n_samples: 1             # completions per problem (1 = greedy)
    k: [1]                   # pass@k for each k <= n_samples
    temperature: 0.8         # only when n_samples > 1
    top_p: 0.95
    max_new_tokens: 384
    stop: ["\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"]
    timeout: 5.0             # seconds per program (wall clock; CPU time is capped too)
    memory_mb: 1024          # address-space limit per program
    workers: 2               # programs run in parallel

A field that does not belong to the task's kind is an error, so a typo or a copy-paste from another kind is
caught when the task is loaded, not silently ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import TunelabError
from ..userfiles import read_text
from ..yamlfile import load_yaml

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # `${ASSETS}` in a task's `data` (as in run configs)
TASKS_DIR = ASSETS / "tasks"
KINDS = ("perplexity", "choice", "exact", "code")
CODE_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # the Codex paper's (Chen et al. 2021) stop set

_COMMON = {"name", "kind", "data", "description", "limit", "skip", "batch_size", "template"}
KIND_FIELDS = {
    "perplexity": _COMMON | {"format", "masking", "turns", "max_length"},
    "choice": _COMMON | {"prompt", "choices_field", "answer_field", "target_delimiter", "chat", "max_length"},
    "exact": _COMMON | {"format", "prompt", "chat", "answer_field", "extract", "regex", "ignore_case",
                        "max_new_tokens", "stop"},
    "code": _COMMON | {"chat", "n_samples", "k", "temperature", "top_p", "max_new_tokens", "stop", "timeout",
                       "memory_mb", "workers"},
}


class TaskSpec(BaseModel):
    """The validated contents of a task YAML (see the module docstring for what each field means)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["perplexity", "choice", "exact", "code"]
    data: str
    description: str = ""
    limit: int | None = Field(None, ge=1)
    skip: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    template: str | None = None
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "text"] = "auto"
    masking: Literal["prompt", "none", "template"] = "prompt"
    turns: Literal["all", "last"] = "all"
    max_length: int = Field(1024, ge=8)
    prompt: str | None = None
    choices_field: str = "choices"
    answer_field: str = "answer"
    target_delimiter: str = " "
    chat: bool | None = None  # kind-dependent default, see `use_chat`
    extract: Literal["gsm8k", "last_number", "regex", "none"] = "last_number"
    regex: str | None = None
    ignore_case: bool = False
    max_new_tokens: int | None = Field(None, ge=1)  # 256 for exact, 384 for code
    stop: list[str] | None = None
    n_samples: int = Field(1, ge=1)
    k: list[int] = Field(default_factory=lambda: [1])
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    timeout: float = Field(5.0, gt=0)
    memory_mb: int = Field(1024, ge=64)
    workers: int = Field(2, ge=1)

    @property
    def use_chat(self) -> bool:
        # Generation tasks are usually asked of chat models; scoring tasks follow lm-eval's raw-text prompts.
        return self.chat if self.chat is not None else self.kind == "exact"

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or (384 if self.kind == "code" else 256)

    @property
    def stops(self) -> list[str]:
        if self.stop is not None:
            return list(self.stop)
        return list(CODE_STOP) if self.kind == "code" and not self.use_chat else []


@dataclass
class Task:
    """A loaded task: its spec, the YAML it came from and the data file it reads."""

    spec: TaskSpec
    path: Path | None  # None for tasks built in code
    data_path: Path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def fingerprint(self) -> str:
        """Hash of the task definition and its data: any edit to either changes it (used by result caches)."""
        h = hashlib.sha256()
        h.update(self.spec.model_dump_json().encode())
        with self.data_path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]

    def records(self, limit: int | None = None):
        """The task's records after the first `skip`, the first `limit` of them (the caller's limit, else the
        task's own)."""
        from ..data.sources import load_records

        limit, skip = limit or self.spec.limit, self.spec.skip
        records = load_records(str(self.data_path), limit=None if limit is None else skip + limit)[skip:]
        if not records:
            raise TunelabError(f"{self.path or self.data_path}: skip={skip} leaves no records")
        return records


def list_tasks() -> list[str]:
    """Names of the bundled tasks."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_task(ref: str | Path | Task) -> Task:
    """A bundled task by name, or a user task by the path of its YAML file."""
    if isinstance(ref, Task):
        return ref
    ref = str(ref)
    bundled = TASKS_DIR / f"{ref}.yaml"
    if bundled.is_file() and "/" not in ref:
        return task_from_yaml(bundled)
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TunelabError(f"task file not found: {ref}")
        return task_from_yaml(path)
    raise TunelabError(f"unknown task '{ref}' (bundled: {', '.join(list_tasks())}; or give the path of a "
                       "task .yaml file)")


def task_from_yaml(path: Path) -> Task:
    """Parse and validate one task file; every problem is one `TunelabError` line naming the file."""
    raw = load_yaml(read_text(path), str(path))  # bounded: alias bombs, depth (yamlfile.py)
    if not isinstance(raw, dict):
        raise TunelabError(f"{path}: a task file must be a mapping of fields (kind, data, ...)")
    raw.setdefault("name", path.stem)
    return task_from_dict(raw, base=path.parent, where=str(path), path=path)


def task_from_dict(raw: dict, base: Path = Path("."), where: str = "task", path: Path | None = None) -> Task:
    """Build a task from a dict with the YAML's fields (relative `data` is resolved against `base`)."""
    kind = raw.get("kind")
    if kind not in KINDS:
        raise TunelabError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    stray = sorted(set(raw) - KIND_FIELDS[kind])
    if stray:
        known = set().union(*KIND_FIELDS.values())
        what = "unknown field" if not set(stray) & known else f"field not used by kind '{kind}'"
        raise TunelabError(f"{where}: {stray[0]}: {what}")
    try:
        spec = TaskSpec(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise TunelabError(f"{where}: {loc}: {err['msg']}") from None
    if spec.kind == "exact" and spec.extract == "regex" and not spec.regex:
        raise TunelabError(f"{where}: extract: regex needs a `regex:` pattern")
    if spec.kind == "choice" and not spec.prompt:
        raise TunelabError(f"{where}: prompt: a choice task needs a prompt (e.g. \"Question: {{question}}\\n"
                           "Answer:\")")
    if spec.kind == "code" and any(k > spec.n_samples or k < 1 for k in spec.k):
        raise TunelabError(f"{where}: k: every k must be between 1 and n_samples ({spec.n_samples})")
    data = Path(spec.data.replace("${ASSETS}", str(ASSETS))).expanduser()
    data = data if data.is_absolute() else (base / data)
    if not data.is_file():
        raise TunelabError(f"{where}: data file not found: {data}")
    return Task(spec, path, data.resolve())


def format_prompt(template: str, record, where: str) -> str:
    """`template` filled with the record's fields (`str.format`), or a `TunelabError` naming the record."""
    try:
        return template.format(**record.data)
    except KeyError as e:
        raise TunelabError(f"{record.origin}: prompt uses field {e} which the record lacks "
                           f"(fields: {', '.join(sorted(record.data))}) [{where}]") from None
    except (IndexError, ValueError) as e:
        raise TunelabError(f"{where}: prompt is not a valid format string ({e}); write literal braces as "
                           "{{ and }}") from None


def item_id(task_name: str, index: int, content) -> str:
    """A per-item id stable across runs and machines: ``<task>:<index>:<8 hex of the item's content>``.

    The content hash (the record's fields as sorted JSON; a perplexity document's token ids) means two runs'
    items pair up only when they scored the same thing — an edited data file changes the ids instead of
    silently pairing different items. Paths are left out: the same task read from another folder pairs."""
    blob = json.dumps(content, sort_keys=True, default=str, ensure_ascii=False)
    return f"{task_name}:{index}:{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

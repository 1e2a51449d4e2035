"""The run configuration: one YAML file plus `key=value` overrides, validated by a pydantic schema.

    tunelab train examples/lora.yaml train.lr=1e-4 lora.r=16 data.masking=none

Every mistake is reported as one line naming the key and, when it came from the file, its line:
`lora.yaml:12: train.lrr: unknown key`. Overrides are parsed as YAML scalars (`1e-4`, `true`, `[q_proj,v_proj]`).
The resolved config is saved in the run directory as `config.yaml`, so a run can always be reproduced.

`RunConfig` holds the sections every run shares; each objective's own section (``dpo:``, ``grpo:``, …) lives with
the objective, below this module, so the full schema is composed there (`objectives.run_config_schema()`, passed
as `load_config(..., schema=)`). Options that moved from the old shared ``pref:`` / ``rl:`` sections to their
objective's section are still read from the old place, with a one-line notice (`move_keys`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .adapters.base import method_names
from .adapters.dora import DoraConfig
from .adapters.lora import LoraConfig
from .adapters.loreft import LoreftConfig
from .adapters.mora import MoraConfig
from .adapters.partial import FreezeConfig
from .adapters.qlora import QLoraConfig
from .config_data import DataConfig
from .config_errors import config_errors
from .console import console
from .errors import TunelabError
from .userfiles import read_text
from .yamlfile import load_yaml, load_yaml_lines


ASSETS = Path(__file__).parent / "assets"  # `${ASSETS}` in a config means the bundled assets folder
CONFIG_DIRS: list[Path] = []  # folders of the config files loaded in this process: user rewards are found there too
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]  # an Adam-style moment decay


class Strict(BaseModel):
    # allow_inf_nan=False: `lr: .nan` or `max_grad_norm: .inf` are typos, never settings
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ModelConfig(Strict):
    name: str = "smollm2-135m"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    allow_pickle: bool = False  # load a folder holding only pickle weights (pytorch_model.bin): runs its code


class DivergenceConfig(Strict):
    """When the loop stops a diverging run (the rule: train/guards.py)."""

    enabled: bool = True
    collapse_fraction: float = Field(0.75, gt=0.0)  # NLL objectives: loss ≥ this · ln(vocab) (uniform output)…
    collapse_jump: float = Field(2.0, gt=1.0)  # …and above this × the running mean of the previous losses,
    min_grad_norm: float = Field(1e-8, ge=0.0)  # …or with a global gradient norm below this


class TrainConfig(Strict):
    epochs: float = Field(1.0, gt=0)
    # raised above a finished run's steps (same output_dir): the run continues from its last checkpoint, on the LR
    # schedule recomputed for the new total from that step (train/continuation.py)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (else epochs); raise it to extend a "
                                  "finished run: the LR schedule is recomputed for the new total from its last step")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    optimizer: str = "AdamW"
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # a negative norm would flip every gradient; null: no clipping
    seed: int = Field(0, ge=0, lt=2**63)  # torch.manual_seed's range
    gradient_checkpointing: bool = False
    memory_mode: bool = False  # rows one at a time + each layer's MLP checkpointed; same gradients (benchmarks/)
    # each layer's forward through torch.compile (models/compiling.py); opt-in: minutes to compile on a CPU
    compile: bool = False
    compute_dtype: Literal["auto", "float32", "bfloat16"] | None = None  # autocast dtype: models/precision.py
    fuse_projections: bool = False  # one GEMM for the frozen q,k,v and gate,up (adapters/fused.py); opt-in
    loss_chunk_size: int = Field(1024, ge=16)
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    resume_from: str | None = Field(None, description="a checkpoint folder (or run folder) to continue from when "
                                    "output_dir has no checkpoint: weights, optimizer, scheduler, RNG and step")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    divergence: DivergenceConfig = DivergenceConfig()


class SampleConfig(Strict):
    prompts: list[str] = []
    n_heldout: int = Field(2, ge=0)
    max_new_tokens: int = Field(96, ge=1)
    at_eval: bool = True  # also generate at every `train.eval_every` evaluation (→ samples.jsonl)


class PrefConfig(Strict):
    """What every preference objective's run measures (dpo, simpo, orpo, kto, reward, via `pairwise.PairMetrics`).

    Shared on purpose: it is the run's measurement protocol, not a loss option, and must stay identical across the
    objectives a study compares. Each objective's own options live in its section (``dpo:``, ``simpo:``, …)."""

    probe: int = Field(64, ge=0)  # training pairs scored before/after (results.json "train")


class ReferenceConfig(Strict):
    """The reference model of dpo/kto (objectives/reference.py)."""

    mode: Literal["auto", "adapter", "copy"] = "auto"  # auto: adapter off (adapter methods) / frozen copy (full)
    device: str | None = None  # copy only: e.g. cpu while the policy is on cuda
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # copy only
    precompute: bool = False  # one pass before training, cached as <output_dir>/reference_logps.safetensors
    sync_every: int | None = Field(None, ge=1)  # TR-DPO: move the reference every τ optimizer steps
    # θ_ref ← α·θ + (1−α)·θ_ref (1 = hard copy); None: the objective's default — 0.6 for the DPO family (TR-DPO's
    # soft update, also online_dpo) and 0.001 for grpo, rloo, ppo (ReaLHF's EMA reference, per step)
    sync_alpha: float | None = Field(None, gt=0.0, le=1.0)


class RLConfig(Strict):
    """The rollouts of every online objective (grpo, rloo, ppo, rejection_sampling, online_dpo; rl/rollout.py).

    One rollout round: `prompts_per_step` prompts × `group_size` completions sampled from the current policy,
    scored by `rewards`, then served to the loop for `ppo_epochs` passes in micro-batches of `train.batch_size`
    rows (`train.grad_accum` micro-batches per optimizer step). What an objective does with the rows (clip range,
    KL coefficient, advantage estimator, which completions to keep) is in its own section (``grpo:``, ``ppo:``, …)."""

    group_size: int = Field(4, ge=1)  # G completions per prompt
    prompts_per_step: int = Field(2, ge=1)  # prompts per rollout round
    ppo_epochs: int = Field(1, ge=1)  # passes over each round's rollouts
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(128, ge=1)
    stop: list[str] = []  # extra stop strings (the template's end of turn always stops)
    # rewards: [{name: exact_match, weight: 1.0, ...options}] — see rl/rewards.py for names and options
    rewards: list[dict[str, Any]] = [{"name": "exact_match"}]
    eval_prompts: int = Field(16, ge=0)  # held-out prompts scored greedily before/after (and at eval_every)
    sampler: str = "torch"  # who samples the rollouts (rl/sampler.py SAMPLERS: torch | vllm)
    # a warning once this many rounds in a row had no group with a reward spread (no gradient); 0: never warn
    warn_no_signal_rounds: int = Field(5, ge=0)


class EvalConfig(Strict):
    target: list[str] = []  # tasks the run should learn (bundled names or task YAML paths)
    source: list[str] = []  # tasks it should not forget
    limit: int | None = Field(None, ge=1)  # items per task
    allow_code_execution: bool = False  # code tasks run model-written code (sandboxed); opt in explicitly
    # where that code runs: bubblewrap (refused where it cannot run), or a Python-level guard you accept knowingly
    sandbox: Literal["bwrap", "unsafe_inprocess"] = "bwrap"
    during_training: bool = False  # also evaluate the target tasks at every train.eval_every (→ metrics.jsonl)


class RunConfig(Strict):
    """The run's sections that every objective shares. Each objective's own section (``dpo:``, ``grpo:``, …) is
    added by the composed schema, `tunelab.objectives.run_config_schema()`, from the objectives' registry — the
    schema every loader of a run config uses (config.py sits above objectives/ and cannot see them)."""

    # Filled in by the composed schema: the registered objectives' names, and the options that moved from a
    # shared section to an objective's own (old dotted key -> its new dotted keys; see `move_keys`).
    OBJECTIVE_NAMES: ClassVar[tuple[str, ...]] = ()
    MOVED: ClassVar[dict[str, tuple[str, ...]]] = {}

    output_dir: str = "runs/run"
    overwrite: bool = False
    resume: bool = True
    # adapter methods (adapters.base's registry): one options section each, named like the method (lora:, …)
    method: str = "lora"  # "partial" is accepted for "freeze"
    objective: str = "sft"  # a registered objective (objectives/registry.py)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    dora: DoraConfig = DoraConfig()
    qlora: QLoraConfig = QLoraConfig()
    mora: MoraConfig = MoraConfig()
    loreft: LoreftConfig = LoreftConfig()
    freeze: FreezeConfig = FreezeConfig()
    train: TrainConfig = TrainConfig()
    samples: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    pref: PrefConfig = PrefConfig()
    reference: ReferenceConfig = ReferenceConfig()
    rl: RLConfig = RLConfig()
    # under torchrun: ddp (replicate), fsdp (FSDP2: shard blocks + the rest), auto (fsdp when the weights would
    # take over a quarter of one accelerator's memory, else ddp) — see train/distributed.py
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    # Multi-stage pipeline: each item overrides this config (e.g. {name: dpo, objective: dpo, train: {lr: 5e-6}});
    # a stage trains from the previous stage's output (or `from: <stage name>`). See train/pipeline.py.
    stages: list[dict[str, Any]] = []

    @model_validator(mode="before")
    @classmethod
    def _moved_options(cls, data):
        return move_keys(data, cls.MOVED) if isinstance(data, dict) and cls.MOVED else data

    @field_validator("method", mode="before")
    @classmethod
    def _method_known(cls, v):
        v = "freeze" if v == "partial" else v  # one method, one options section (freeze:)
        if isinstance(v, str) and v not in method_names():
            raise ValueError(f"unknown method; choose from {', '.join(n for n in method_names() if n != 'partial')}")
        return v

    @field_validator("objective")
    @classmethod
    def _objective_known(cls, v: str) -> str:
        if cls.OBJECTIVE_NAMES and v not in cls.OBJECTIVE_NAMES:
            raise ValueError(f"unknown objective; choose from {', '.join(cls.OBJECTIVE_NAMES)}")
        return v

    @field_validator("output_dir")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


# old dotted keys already announced in this process (each deprecation notice is printed once)
NOTICES_SHOWN: set[str] = set()


def _deprecated(old: str, targets, objective) -> None:
    """The one-line notice for moved key `old`, once per process (naming the running objective's new key)."""
    if old not in NOTICES_SHOWN:
        NOTICES_SHOWN.add(old)
        own = [t for t in targets if t.split(".")[0] == objective] or list(targets)
        console.print(f"[yellow]deprecated: {old} is now {' / '.join(own)} (each objective has its own "
                      "section; the old key still works)[/]", soft_wrap=True)


def move_keys(raw: dict, moved: dict[str, tuple[str, ...]], lines: dict | None = None) -> dict:
    """`raw` (a run config mapping) with every option that moved read from its old place: ``pref.beta: 0.2``
    becomes ``dpo.beta: 0.2`` (and the same in every other section that took the option over, since the old key
    applied to whichever objective ran). An explicit new key wins; a null old value (it meant "the objective's
    default") is dropped. `stages:` items are moved the same way. `lines` (load_config's error bookkeeping)
    learns the new paths, so an error still names the old key's file line. Prints one deprecation notice per
    old key and process."""
    raw = dict(raw)
    for old, targets in moved.items():
        section, key = old.split(".")
        node = raw.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        node = raw[section] = dict(node)
        value = node.pop(key)
        for target in targets:
            tsec, tkey = target.split(".")
            dest = raw.get(tsec)
            dest = raw[tsec] = dict(dest) if isinstance(dest, dict) else {}
            if value is not None and tkey not in dest:
                dest[tkey] = value
                if lines is not None and (section, key) in lines:
                    lines.setdefault((tsec, tkey), lines[(section, key)])
        _deprecated(old, targets, raw.get("objective"))
    if isinstance(raw.get("stages"), list):
        raw["stages"] = [move_keys(st, moved) if isinstance(st, dict) else st for st in raw["stages"]]
    return raw


def method_options(cfg: RunConfig):
    """The options section of the run's method (`cfg.lora` for lora, `cfg.dora` for dora, …)."""
    return getattr(cfg, cfg.method, None)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise TunelabError(f"override '{item}': expected key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = load_yaml(raw, "override", floats=True) if raw != "" else ""
    except TunelabError:
        value = raw
    if isinstance(value, str) and _looks_float(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key.strip().split("."), value


def _looks_float(s: str) -> bool:
    try:
        float(s)
        return any(c in s.lower() for c in "e.") and not s.strip().lower() in ("nan", "inf")
    except ValueError:
        return False


def load_config(path: str | Path | None, overrides: list[str] = (), schema=None) -> RunConfig:
    """Read YAML, apply dotted overrides, validate; raises TunelabError with the culprit's file:line."""
    schema = schema or RunConfig
    raw: dict = {}
    lines: dict = {}
    name = "overrides"
    if path is not None:
        p = Path(path)
        name = str(p)
        if not p.is_file():
            raise TunelabError(f"config not found: {p}")
        text = read_text(p).replace("${ASSETS}", str(ASSETS))
        if p.resolve().parent not in CONFIG_DIRS:
            CONFIG_DIRS.append(p.resolve().parent)
        raw, lines = load_yaml_lines(text, name, floats=True)  # bounded: alias bombs, depth (yamlfile.py)
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise TunelabError(f"{p}: the config must be a mapping of keys to values")
    moved = getattr(schema, "MOVED", None) or {}
    raw = move_keys(raw, moved, lines) if moved else raw  # the file's old keys, before any override
    from_override: set[tuple[str, ...]] = set()
    parsed = [(item, *parse_override(item.replace("${ASSETS}", str(ASSETS)))) for item in overrides]
    objective = next((v for _, k, v in reversed(parsed) if k == ["objective"]), raw.get("objective"))
    for item, keys, value in parsed:
        targets = moved.get(".".join(keys))
        if targets:  # an override of a moved key sets it at every new place (and wins over the file, as overrides do)
            _deprecated(".".join(keys), targets, objective)
        for path in [t.split(".") for t in targets] if targets else [keys]:
            node = raw
            for k in path[:-1]:
                if not isinstance(node.get(k, {}), dict):
                    raise TunelabError(f"override '{item}': {k} is not a section")
                node[k] = dict(node.get(k, {}))  # a section shared through a YAML alias changes here only
                node = node[k]
            node[path[-1]] = value
            from_override.add(tuple(path))
    try:
        return schema.model_validate(raw)
    except ValidationError as e:  # every error at once, each with its file:line and a suggestion for typos
        raise config_errors(e, schema, name, lines, from_override) from None


def save_config(cfg: BaseModel, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def substitute_text(node, token: str, value: str):
    """`node` (a config tree of dicts, lists and scalars) with `token` replaced by `value` in every string
    (a sweep's ${SWEEP_DIR}, a pipeline's ${PIPELINE_DIR})."""
    if isinstance(node, dict):
        return {k: substitute_text(v, token, value) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_text(v, token, value) for v in node]
    return node.replace(token, value) if isinstance(node, str) else node

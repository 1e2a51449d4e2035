"""The run configuration: one YAML file plus `key=value` overrides, validated by a pydantic schema.

    tunelab train examples/lora.yaml train.lr=1e-4 lora.r=16 data.masking=none

Every mistake is reported as one line naming the key and, when it came from the file, its line:
`lora.yaml:12: train.lrr: unknown key`. Overrides are parsed as YAML scalars (`1e-4`, `true`, `[q_proj,v_proj]`).
The resolved config is saved in the run directory as `config.yaml`, so a run can always be reproduced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .adapters.dora import DoraConfig
from .adapters.lora import LoraConfig
from .adapters.loreft import LoreftConfig
from .adapters.mora import MoraConfig
from .adapters.partial import FreezeConfig
from .adapters.qlora import QLoraConfig
from .errors import TunelabError


ASSETS = Path(__file__).parent / "assets"  # `${ASSETS}` in a config means the bundled assets folder


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(Strict):
    name: str = "smollm2-135m"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None


class DataConfig(Strict):
    train: str | None = None
    eval: str | None = None
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    eval_max: int = Field(64, ge=0)
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "text", "preference", "unpaired"] = "auto"
    split: str | None = None
    limit: int | None = Field(None, ge=1)
    template: str = "auto"
    masking: Literal["prompt", "none", "template"] = "prompt"
    turns: Literal["all", "last"] = "all"
    max_length: int = Field(1024, ge=8)
    packing: bool = True
    group_by_length: bool = False  # unpacked rows only: batches of similar lengths (less padding)


class TrainConfig(Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    optimizer: str = "AdamW"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    # the memory switch (benchmarks/README.md): rows one at a time + each layer's MLP checkpointed; same gradients
    memory_mode: bool = False
    loss_chunk_size: int = Field(1024, ge=16)
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []


class SampleConfig(Strict):
    prompts: list[str] = []
    n_heldout: int = Field(2, ge=0)
    max_new_tokens: int = Field(96, ge=1)
    at_eval: bool = True  # also generate at every `train.eval_every` evaluation (→ samples.jsonl)


class PrefConfig(Strict):
    """Preference-objective options (`objective` dpo/simpo/orpo/kto/reward); see each objective's module."""

    loss: Literal["sigmoid", "ipo", "cdpo", "robust", "hinge"] = "sigmoid"  # dpo only
    # None = the objective's default: dpo/ipo 0.1 (β, τ for ipo), simpo 2.0, orpo 0.1 (λ), kto 0.1
    beta: float | None = Field(None, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # ε of cdpo/robust (and simpo's smoothed form)
    sft_weight: float = Field(0.0, ge=0.0)  # RPO-style NLL on the chosen response, any pairwise objective
    gamma_beta_ratio: float = Field(0.5, ge=0.0)  # simpo: γ/β
    # orpo: the NLL term over prompt + chosen response, as the paper's code and TRL (false = response only)
    orpo_prompt_loss: bool = True
    desirable_weight: float = Field(1.0, gt=0)  # kto λ_D
    undesirable_weight: float = Field(1.0, gt=0)  # kto λ_U
    center_rewards: float = Field(0.0, ge=0.0)  # reward model: c in c·(r⁺ + r⁻)²
    probe: int = Field(64, ge=0)  # training pairs scored before/after training (results.json "train")


class ReferenceConfig(Strict):
    """The reference model of dpo/kto (objectives/reference.py)."""

    mode: Literal["auto", "adapter", "copy"] = "auto"  # auto: adapter off (adapter methods) / frozen copy (full)
    device: str | None = None  # copy only: e.g. cpu while the policy is on cuda
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # copy only
    precompute: bool = False  # one pass before training, cached as <output_dir>/reference_logps.safetensors
    sync_every: int | None = Field(None, ge=1)  # TR-DPO: move the reference every τ optimizer steps
    sync_alpha: float = Field(0.6, gt=0.0, le=1.0)  # θ_ref ← α·θ + (1−α)·θ_ref (1 = hard copy)


class RLConfig(Strict):
    """Online RL (`objective` grpo, rloo, rejection_sampling, online_dpo); see rl/rollout.py and objectives/grpo.py.

    One rollout round: `prompts_per_step` prompts × `group_size` completions sampled from the current policy,
    scored by `rewards`, then served to the loop for `ppo_epochs` passes in micro-batches of `train.batch_size`
    rows (`train.grad_accum` micro-batches per optimizer step)."""

    group_size: int = Field(4, ge=1)  # G completions per prompt
    prompts_per_step: int = Field(2, ge=1)  # prompts per rollout round
    ppo_epochs: int = Field(1, ge=1)  # passes over each round's rollouts
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(128, ge=1)
    stop: list[str] = []  # extra stop strings (the template's end of turn always stops)
    # rewards: [{name: exact_match, weight: 1.0, ...options}] — see rl/rewards.py for names and options
    rewards: list[dict[str, Any]] = [{"name": "exact_match"}]
    advantage: Literal["grpo", "dr_grpo", "rloo"] | None = None  # None: the objective's own (grpo / rloo)
    beta: float = Field(0.0, ge=0.0)  # KL(π‖π_ref) coefficient (0: no reference forward at all)
    kl_estimator: Literal["k1", "k3"] = "k3"
    epsilon: float = Field(0.2, gt=0.0)  # clip range (low)
    epsilon_high: float | None = Field(None, gt=0.0)  # clip range (high); None = epsilon (DAPO: 0.28)
    loss_agg: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    keep: Literal["best", "threshold"] = "best"  # rejection_sampling: best of G, or every one ≥ keep_threshold
    keep_threshold: float = 1.0
    eval_prompts: int = Field(16, ge=0)  # held-out prompts scored greedily before/after (and at eval_every)


class EvalConfig(Strict):
    target: list[str] = []  # tasks the run should learn (bundled names or task YAML paths)
    source: list[str] = []  # tasks it should not forget
    limit: int | None = Field(None, ge=1)  # items per task
    allow_code_execution: bool = False  # code tasks run model-written code (sandboxed); opt in explicitly
    during_training: bool = False  # also evaluate the target tasks at every train.eval_every (→ metrics.jsonl)


class RunConfig(Strict):
    output_dir: str = "runs/run"
    overwrite: bool = False
    resume: bool = True
    # adapter methods: one options section each, named like the method (lora:, dora:, mora:, …)
    method: Literal["full", "lora", "mora", "loreft", "freeze",
                    "dora", "qlora"] = "lora"  # "partial" is accepted for "freeze"
    objective: Literal["sft", "dpo", "simpo", "orpo", "kto", "reward",
                       "grpo", "rloo", "rejection_sampling", "online_dpo"] = "sft"
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
    # Multi-stage pipeline: each item overrides this config (e.g. {name: dpo, objective: dpo, train: {lr: 5e-6}});
    # a stage trains from the previous stage's output (or `from: <stage name>`). See train/pipeline.py.
    stages: list[dict[str, Any]] = []

    @field_validator("method", mode="before")
    @classmethod
    def _method_alias(cls, v):
        return "freeze" if v == "partial" else v  # one method, one options section (freeze:)

    @field_validator("output_dir")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


def method_options(cfg: RunConfig):
    """The options section of the run's method (`cfg.lora` for lora, `cfg.dora` for dora, …)."""
    return getattr(cfg, cfg.method, None)


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each dotted key path of a YAML mapping to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (str(k.value),)
                lines[p] = k.start_mark.line + 1
                walk(v, p)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise TunelabError(f"override '{item}': expected key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
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


def _fix_floats(node):
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and _looks_float(node):
        return float(node)
    return node


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
        text = p.read_text().replace("${ASSETS}", str(ASSETS))
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise TunelabError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})")
        if not isinstance(raw, dict):
            raise TunelabError(f"{p}: the config must be a mapping of keys to values")
        lines = _line_index(text)
        raw = _fix_floats(raw)
    from_override: set[tuple[str, ...]] = set()
    for item in overrides:
        keys, value = parse_override(item.replace("${ASSETS}", str(ASSETS)))
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise TunelabError(f"override '{item}': {k} is not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        from_override.add(tuple(keys))
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(str(x) for x in err["loc"])
        dotted = ".".join(loc)
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] != "extra_forbidden" and "input" in err:
            msg += f" (got {err['input']!r})"
        key = next((loc[:i] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
        where = "override" if tuple(loc) in from_override or key is None else f"{name}:{lines[key]}"
        raise TunelabError(f"{where}: {dotted}: {msg}")


def save_config(cfg: BaseModel, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

"""The run configuration: one YAML file plus `key=value` overrides, validated by a pydantic schema.

    tunelab train examples/lora.yaml train.lr=1e-4 lora.r=16 data.masking=none

Every mistake is reported as one line naming the key and, when it came from the file, its line:
`lora.yaml:12: train.lrr: unknown key`. Overrides are parsed as YAML scalars (`1e-4`, `true`, `[q_proj,v_proj]`).
The resolved config is saved in the run directory as `config.yaml`, so a run can always be reproduced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .adapters.dora import DoraConfig
from .adapters.lora import LoraConfig
from .adapters.loreft import LoreftConfig
from .adapters.mora import MoraConfig
from .adapters.partial import FreezeConfig
from .adapters.qlora import QLoraConfig
from .config_errors import config_errors
from .errors import TunelabError
from .userfiles import read_text
from .yamlfile import load_yaml, load_yaml_lines


ASSETS = Path(__file__).parent / "assets"  # `${ASSETS}` in a config means the bundled assets folder
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


class DivergenceConfig(Strict):
    """When the loop stops a diverging run (the rule: train/guards.py)."""

    enabled: bool = True
    collapse_fraction: float = Field(0.75, gt=0.0)  # NLL objectives: loss ≥ this · ln(vocab) (uniform output)…
    collapse_jump: float = Field(2.0, gt=1.0)  # …and above this × the running mean of the previous losses,
    min_grad_norm: float = Field(1e-8, ge=0.0)  # …or with a global gradient norm below this


class TrainConfig(Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
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
    # the memory switch (benchmarks/README.md): rows one at a time + each layer's MLP checkpointed; same gradients
    memory_mode: bool = False
    # each decoder layer's training forward through torch.compile (models/compiling.py); opt-in: compiling costs
    # minutes on a CPU before step 1, and benchmarks/README.md has what it gains on this workload
    compile: bool = False
    loss_chunk_size: int = Field(1024, ge=16)
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    divergence: DivergenceConfig = DivergenceConfig()


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
    kl_estimator: Literal["k1", "k3"] | None = None  # None: the objective's own (grpo/rloo k3, ppo k1)
    epsilon: float = Field(0.2, gt=0.0, lt=1.0)  # clip range (low): ratios below 1 − ε are clipped
    epsilon_high: float | None = Field(None, gt=0.0)  # clip range (high); None = epsilon (DAPO: 0.28)
    loss_agg: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    # grpo/rloo: score a prompt's completions with the prompt encoded once (exact; objectives/prompt_sharing.py)
    share_prompts: bool = True
    keep: Literal["best", "threshold"] = "best"  # rejection_sampling: best of G, or every one ≥ keep_threshold
    keep_threshold: float = 1.0
    eval_prompts: int = Field(16, ge=0)  # held-out prompts scored greedily before/after (and at eval_every)


class PPOConfig(Strict):
    """PPO (`objective: ppo`; objectives/ppo.py, objectives/value.py, rl/ppo_round.py). The KL coefficient β is
    ``rl.beta`` (in the reward, per token), the policy clip ε is ``rl.epsilon``, the passes over a round are
    ``rl.ppo_epochs``; a round is ``rl.prompts_per_step × rl.group_size`` completions."""

    value_model: Literal["auto", "adapter", "copy"] = "auto"  # auto: adapter (adapter methods) / copy (full)
    value_init: str | None = None  # an `objective: reward` run: V starts as it (head + body)
    value_coef: float = Field(0.1, ge=0.0)  # c_v
    epsilon_value: float | None = Field(0.2, gt=0.0)  # value clip ε_v (None: unclipped value loss)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    whiten_advantages: bool = True  # normalise A over each round's completion tokens (Xu et al. 2024)
    reward_norm: bool = False  # normalise the round's sequence scores to mean 0, std 1
    reward_clip: float | None = Field(None, gt=0.0)  # then clip them to ±reward_clip
    missing_eot_penalty: float = Field(0.0, ge=0.0)  # subtracted from the score of a completion that hit rl.max_new_tokens
    adaptive_kl: bool = False  # Ziegler et al. 2019: β moves to keep the per-sequence KL near kl_target
    kl_target: float = Field(6.0, gt=0.0)
    kl_horizon: int = Field(10000, ge=1)
    target_kl: float | None = Field(None, gt=0.0)  # early stop a round when a minibatch's approx-KL exceeds it


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
                       "grpo", "rloo", "rejection_sampling", "online_dpo", "ppo"] = "sft"
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
    ppo: PPOConfig = PPOConfig()
    # under torchrun: ddp (replicate), fsdp (FSDP2: shard blocks + the rest), auto (fsdp when the weights would
    # take over a quarter of one accelerator's memory, else ddp) — see train/distributed.py
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
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
        raw, lines = load_yaml_lines(text, name, floats=True)  # bounded: alias bombs, depth (yamlfile.py)
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise TunelabError(f"{p}: the config must be a mapping of keys to values")
    from_override: set[tuple[str, ...]] = set()
    for item in overrides:
        keys, value = parse_override(item.replace("${ASSETS}", str(ASSETS)))
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise TunelabError(f"override '{item}': {k} is not a section")
            node[k] = dict(node.get(k, {}))  # a section shared through a YAML alias changes here only
            node = node[k]
        node[keys[-1]] = value
        from_override.add(tuple(keys))
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

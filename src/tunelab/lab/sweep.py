"""Sweep files: one base run config, and the variants to train from it.

A sweep is a YAML file::

    name: lora_vs_full              # default: the file name without .yaml
    description: LoRA learns less and forgets less (Biderman et al. 2024)
    output_dir: runs/studies/lora_vs_full   # the sweep folder; default runs/sweeps/<name>
    base: ../lora.yaml              # a run config: a path relative to THIS file, or an inline mapping
    overrides:                      # dotted key → value, applied to every variant
      train.max_steps: 40
    grid:                           # cartesian product of dotted key → list of values
      method: [lora, dora]
      lora.r: [8, 64]
    variants:                       # and/or an explicit list (each crossed with the grid)
      - name: full
        overrides: {method: full, train.lr: 2.0e-5}
    scale:                          # optional: a partial sweep merged on top with `--scale`
      output_dir: runs/studies/lora_vs_full-1b
      overrides: {model.name: meta-llama/Llama-3.2-1B, train.max_steps: 2000}
    seeds: 3                        # every variant once per train.seed 0, 1, 2 (or a list: [0, 7, 42])
    claims:                         # what the study tests: `tunelab.lab.claims` computes each verdict
      - {better: full, than: lora-r8, on: code_heldout, expected: "full finetuning learns more (paper, fig. 2)"}
      - {better: lora-r8, than: full, on: prose, direction: lower}   # direction: the task's own by default
      - {better: dora, than: lora, on: prose, margin: 0.02}   # smallest Δ that matters: adds "negligible"
    match: [tokens_trained]         # compare refuses when the variants' configured budgets differ > 5 % on these
                                    # (MATCHABLE: steps, tokens, completions, …, flops = flops_train + flops_sampling)

A variant may also declare ``budget: {completions_sampled: 640}``: what it consumed *outside* its run (pairs sampled
from the policy beforehand), added to its configured budget for ``match`` and the report.

Each variant's config is ``base`` + ``overrides`` + its own overrides + its grid point, in that order (later
wins). ``${SWEEP_DIR}`` anywhere in the file means the folder holding the sweep file (so bundled study data
can be found from any working directory); ``${ASSETS}`` means tunelab's bundled assets as in run configs.
Relative data paths inside a run config stay relative to the working directory, as for `tunelab train`.

Variant names are readable and stable — the explicit ``name`` and/or the grid point written as
``method=lora,lora.r=8`` (paths shortened to their file stem) — because they name the run folders
``<output_dir>/runs/<name>`` (with ``seeds:``, ``<output_dir>/runs/<name>/seed-<k>``, ``train.seed = k``) that make
a sweep resumable.
"""

from __future__ import annotations

import copy
import itertools
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import CONFIG_DIRS, load_config, parse_override, substitute_text
from ..errors import TunelabError
from ..objectives import load_run_config
from ..userfiles import read_text
from ..yamlfile import load_yaml


MATCHABLE = ("steps", "sequences_trained", "tokens_trained", "completions_sampled", "tokens_sampled",
             "reward_model_calls", "flops", "flops_train", "flops_sampling")  # train.accounting's QUANTITIES


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    overrides: dict[str, Any] = {}
    budget: dict[Literal[MATCHABLE], float] = {}  # consumed outside the run (completions sampled for its pairs)


class ClaimSpec(BaseModel):
    """One claim of a study: `better` beats `than` on task `on` (in the task's own direction unless given)."""

    model_config = ConfigDict(extra="forbid")

    better: str
    than: str
    on: str
    direction: Literal["higher", "lower"] | None = None
    expected: str = ""  # what the paper says, quoted in the report
    margin: float | None = Field(default=None, gt=0)  # smallest difference that matters, declared before the runs

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data):
        """YAML 1.1 reads a bare ``on:`` key as the boolean True: take it back as ``on``."""
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data




class SweepSpec(BaseModel):
    """The validated sweep file (see the module docstring for what each key means)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str = ""
    output_dir: str | None = None
    base: str | dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    variants: list[VariantSpec] = []
    scale: dict[str, Any] | None = None
    seeds: int | list[int] | None = None
    claims: list[ClaimSpec] = []
    match: list[Literal[MATCHABLE]] = []


@dataclass
class Variant:
    """One run of a sweep: its name, the overrides that define it, and its merged (unvalidated) config."""

    name: str
    overrides: dict[str, Any]  # the variant's own overrides + grid point (what distinguishes it)
    raw: dict[str, Any]  # base + common + own overrides, output_dir set
    run_dir: Path
    seed: int | None = None  # set by a sweep with `seeds:` (then raw's train.seed is it)
    budget: dict[str, float] = field(default_factory=dict)  # consumed outside the run (VariantSpec.budget)

    @property
    def key(self) -> str:
        """The variant and its seed: ``lora-r8/seed-1`` (just the name without `seeds:`)."""
        return self.name if self.seed is None else f"{self.name}/seed-{self.seed}"


@dataclass
class Sweep:
    name: str
    description: str
    path: Path | None
    output_dir: Path
    variants: list[Variant] = field(default_factory=list)
    seeds: list[int] | None = None
    claims: list[ClaimSpec] = field(default_factory=list)
    match: list[str] = field(default_factory=list)

    @property
    def runs_dir(self) -> Path:
        return self.output_dir / "runs"

    @property
    def report_dir(self) -> Path:
        return self.output_dir / "report"


def load_sweep(path: str | Path, overrides: list[str] = (), scale: bool = False) -> Sweep:
    """Read and validate a sweep file; `overrides` (``key=value``) apply to every variant's run config.

    Only the sweep's structure is checked here; each variant's run config is validated by `resolve`.
    """
    path = Path(path)
    spec = load_config(path, schema=SweepSpec)  # file:line errors, ${ASSETS}, "1e-4" floats, like run configs
    raw_spec = substitute_text(spec.model_dump(), "${SWEEP_DIR}", str(path.resolve().parent))
    if scale:
        if not raw_spec.get("scale"):
            raise TunelabError(f"{path}: --scale given but the sweep has no `scale:` section")
        raw_spec = _merge_scale(raw_spec, raw_spec["scale"], path)
    try:
        spec = SweepSpec.model_validate(raw_spec)
    except ValidationError as e:  # only reachable through `scale:`; the file itself was validated above
        err = e.errors()[0]
        raise TunelabError(f"{path}: scale: {'.'.join(map(str, err['loc']))}: {err['msg']}")
    common = dict(spec.overrides)
    for item in overrides:
        keys, value = parse_override(item)
        common[".".join(keys)] = value
    sweep = build_sweep(spec, common, path)
    from .claims import check_claims

    check_claims(sweep)  # unknown variants / tasks: file:line, before anything is written
    return sweep


def build_sweep(spec: SweepSpec, common: dict, path: Path | None) -> Sweep:
    """Expand a validated spec into variants (the product of `variants` and `grid`)."""
    name = spec.name or (path.stem if path else "sweep")
    out = Path(spec.output_dir) if spec.output_dir else Path("runs") / "sweeps" / name
    base = _base_config(spec.base, path)
    points = [dict(zip(spec.grid, combo)) for combo in itertools.product(*spec.grid.values())]
    listed = spec.variants or [VariantSpec()]
    if not spec.grid and not spec.variants:
        raise TunelabError(f"{path or 'sweep'}: nothing to compare: give `grid:` and/or `variants:`")
    seeds = list(range(spec.seeds)) if isinstance(spec.seeds, int) else spec.seeds
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise TunelabError(f"{path or 'sweep'}: seeds: give a count ≥ 1 or a list of distinct seeds ≥ 0")
    sweep = Sweep(name, spec.description.strip(), path, out, seeds=seeds, claims=list(spec.claims),
                  match=list(spec.match))
    seen: dict[str, str] = {}
    for v in listed:
        for point in points:
            own = {**v.overrides, **point}
            label = ",".join(x for x in (v.name, variant_name(point)) if x) or variant_name(v.overrides) or "base"
            folder = safe_dirname(label)
            if folder in seen:
                raise TunelabError(f"{path or 'sweep'}: two variants are both named '{folder}'; give them "
                                   "distinct `name:`s")
            seen[folder] = label
            raw = copy.deepcopy(base)
            for key, value in {**common, **own}.items():
                set_dotted(raw, key, value)
            for seed in seeds if seeds is not None else [None]:
                run_dir = sweep.runs_dir / folder
                one = copy.deepcopy(raw)
                if seed is not None:
                    run_dir = run_dir / f"seed-{seed}"
                    set_dotted(one, "train.seed", seed)
                    for stage in one.get("stages") or []:  # a stage's own train.seed would override the seed
                        if isinstance(stage, dict) and isinstance(stage.get("train"), dict):
                            stage["train"].pop("seed", None)
                one["output_dir"] = str(run_dir)  # the sweep owns where runs go: that is what makes it resumable
                one["overwrite"] = False
                sweep.variants.append(Variant(label, own, one, run_dir, seed, dict(v.budget)))
    return sweep


def resolve(sweep: Sweep, variant: Variant, write: bool = True):
    """Validate one variant's run config: written to ``<sweep>/configs/<name>.yaml`` and loaded from there,
    so errors name a real file and line, and any variant can be rerun by hand with `tunelab train`.

    ``write=False`` (a dry run) writes nothing in the sweep folder: the same text is loaded from a temporary copy,
    and an error names the file and line it would have had."""
    cfg_path = config_path(sweep, variant)
    text = f"# variant '{variant.key}' of sweep '{sweep.name}' (written by tunelab compare)\n" + \
        yaml.safe_dump(variant.raw, sort_keys=False)
    if not write:
        with tempfile.TemporaryDirectory(prefix="tunelab-dry-run-") as tmp:
            probe = Path(tmp) / cfg_path.name
            probe.write_text(text)
            try:
                return load_run_config(probe)
            except TunelabError as e:
                raise TunelabError(str(e).replace(str(probe), f"{cfg_path} (not written: dry run)")) from None
            finally:
                if probe.resolve().parent in CONFIG_DIRS:
                    CONFIG_DIRS.remove(probe.resolve().parent)
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    if not cfg_path.exists() or cfg_path.read_text() != text:  # unchanged files keep their mtime
        cfg_path.write_text(text)
    return load_run_config(cfg_path)


def config_path(sweep: Sweep, variant: Variant) -> Path:
    """``<sweep>/configs/<variant>.yaml`` (with seeds: ``<variant>.seed-<k>.yaml``)."""
    stem = variant.run_dir.name if variant.seed is None else f"{variant.run_dir.parent.name}.seed-{variant.seed}"
    return sweep.output_dir / "configs" / f"{stem}.yaml"


def variant_name(overrides: dict[str, Any]) -> str:
    """``{"method": "lora", "lora.r": 8}`` → ``method=lora,lora.r=8``."""
    return ",".join(f"{k}={_short(v)}" for k, v in overrides.items())


def _short(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value).stem  # data.train=${SWEEP_DIR}/data/code.jsonl → data.train=code
    if isinstance(value, (list, tuple)):
        return "[" + "+".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + variant_name(value) + "}"
    return str(value)


def safe_dirname(label: str) -> str:
    """A folder name for a variant label that needs no quoting in a shell: only ``[A-Za-z0-9._-]``.

    ``=`` becomes ``-`` and everything else outside that set ``_``, so ``method=lora,lora.r=8`` is the folder
    ``method-lora_lora.r-8`` (the label itself, which claims and reports use, is unchanged). A leading ``-`` or
    ``.`` is dropped: a folder must not read as an option or be hidden."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", label.replace("=", "-")).lstrip(".-") or "variant"
    return name[:150]  # file systems cap names at 255 bytes


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping; a mapping value is merged into an existing section."""
    keys = key.split(".")
    node = raw
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise TunelabError(f"override '{key}': {k} is not a section")
        node = nxt
    last = keys[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for k, v in value.items():
            set_dotted(node[last], k, v)
    else:
        node[last] = copy.deepcopy(value)


def _base_config(base: str | dict, path: Path | None) -> dict:
    if isinstance(base, dict):
        raw: dict = {}
        for k, v in base.items():  # dotted keys are allowed in an inline base too
            set_dotted(raw, k, v)
        return raw
    p = Path(base)
    if not p.is_absolute() and path is not None:
        p = path.parent / p
    if not p.is_file():
        raise TunelabError(f"{path or 'sweep'}: base: run config not found: {p}")
    raw = load_yaml(read_text(p), str(p), floats=True)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise TunelabError(f"{p}: the config must be a mapping of keys to values")
    return substitute_text(raw, "${SWEEP_DIR}", str(path.resolve().parent) if path else ".")


def _merge_scale(spec: dict, scale: dict, path: Path) -> dict:
    """`scale:` replaces top-level keys, except `overrides` and `grid`, which it extends."""
    out = {k: v for k, v in spec.items() if k != "scale"}
    for key, value in scale.items():
        if key not in SweepSpec.model_fields or key == "scale":
            raise TunelabError(f"{path}: scale.{key}: unknown key")
        if key in ("overrides", "grid") and isinstance(value, dict):
            out[key] = {**(out.get(key) or {}), **value}
        else:
            out[key] = value
    return out

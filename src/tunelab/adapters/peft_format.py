"""PEFT's on-disk LoRA format: export tunelab adapters, import adapters PEFT (or tunelab) wrote.

A PEFT adapter folder holds two files (checked against PEFT 0.21's own `save_pretrained`):

* `adapter_config.json` — `peft_type: "LORA"`, `task_type: "CAUSAL_LM"`, `base_model_name_or_path`, `r`,
  `lora_alpha`, `lora_dropout`, `use_rslora` (scale s = lora_alpha/r, or lora_alpha/sqrt(r)), `target_modules`,
  `modules_to_save`, `rank_pattern`/`alpha_pattern` (per-module r and alpha; key k matches module n when
  re.match(r"(.*\\.)?(k)$", n)), `ensure_weight_tying`, and the fixed `bias: "none"`, `fan_in_fan_out: false`,
  `init_lora_weights: true`, `use_dora: false`.
* `adapter_model.safetensors` — keys `base_model.model.<module path>.lora_A.weight` [r, in] and
  `.lora_B.weight` [out, r] (the adapter name "default" is dropped), plus, for each module in
  modules_to_save, its full trained tensors under `base_model.model.<module path>.<param>` (PEFT saves its
  `modules_to_save.default.weight` copy under the plain name). For a tied embedding trained with
  `ensure_weight_tying: true`, PEFT writes both `...embed_tokens.weight` and `lm_head.weight`; so do we.

tunelab keys are PEFT keys minus the `base_model.model.` prefix, so conversion is a prefix change. Only
safetensors is read or written; a pickle `adapter_model.bin` is refused.

Written so the rest of the ecosystem (`PeftModel`, `AutoPeftModelForCausalLM`, vLLM) takes the folder as is:

* `base_model_name_or_path` is what `from_pretrained` resolves outside tunelab (`models.load.ecosystem_ref`):
  the hub id of an alias (`smollm2-135m` → `HuggingFaceTB/SmolLM2-135M-Instruct`), the absolute path of a local
  folder, a hub id unchanged. tunelab never reads it: a run's base comes from its config.yaml (`model.name`,
  the alias itself), which loads offline.
* `target_modules` is written compactly, as PEFT writes it (`target_modules_value`): the leaf names
  (`["down_proj", …, "v_proj"]`) when they select exactly the trained modules under PEFT's rule (module name n
  matches target t when n == t or n ends with "." + t), else a full-match regex over layer indices and
  sub-paths (PEFT reads a str target as `re.fullmatch`), checked the same way, else the full module paths.
  Every candidate is checked against all module names of the base model, so loading in PEFT adapts exactly
  the modules tunelab trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import TunelabError
from . import base
from .extras import FullyTrained, tied_groups

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Config fields that change the math in ways tunelab's LoRA does not implement: (field, its neutral value).
_UNSUPPORTED = [("fan_in_fan_out", False), ("lora_bias", False), ("bias", "none"), ("target_parameters", None),
                ("trainable_token_indices", None), ("layer_replication", None), ("use_qalora", False),
                ("use_bdlora", None), ("alora_invocation_tokens", None), ("arrow_config", None),
                ("kasa_config", None), ("velora_config", None), ("monteclora_config", None)]


def _split(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    targets = {n: m for n, m in base.adapter_modules(model) if not isinstance(m, FullyTrained)}
    extras = [n for n, m in base.adapter_modules(model) if isinstance(m, FullyTrained)]
    return targets, extras


def _mode(values):
    values = list(values)
    return max(values, key=values.count)  # ties go to the first layer in model order


def base_module_names(model: nn.Module) -> list[str]:
    """Module names of the model as it was before wrapping: adapter modules count as the module they replaced
    (their own children — lora_A, lora_B … — are not base modules)."""
    names, inside = [], None
    for name, module in model.named_modules():
        if not name:
            continue
        if inside is not None and name.startswith(inside):
            continue
        names.append(name)
        inside = name + "." if isinstance(module, base.AdapterModule) else None
    return names


def _peft_selects(target, names: list[str]) -> set[str]:
    """The names PEFT adapts for `target_modules=target` (tuners_utils.check_target_module_exists)."""
    if isinstance(target, str):
        return {n for n in names if re.fullmatch(target, n)}
    wanted = set(target)
    return {n for n in names if n in wanted or any(n.endswith("." + t) for t in wanted)}


def _alternatives(items) -> str:
    items = sorted(set(items), key=lambda x: (len(x), x) if x.isdigit() else (0, x))
    return items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"


def _layer_regexes(targets: list[str]) -> list[str]:
    """Candidate regexes `prefix\\.(?:i|j…)\\.(…)` when the targets are every (layer index × sub-path)
    combination under one prefix (some layers, the same modules in each): by leaf name, then by sub-path."""
    split = []
    for t in targets:
        parts = t.split(".")
        k = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if k is None or k == len(parts) - 1:
            return []
        split.append((".".join(parts[:k]), parts[k], ".".join(parts[k + 1:])))
    prefixes = {p for p, _, _ in split}
    idx, rests = {i for _, i, _ in split}, {r for _, _, r in split}
    if len(prefixes) != 1 or len(idx) * len(rests) != len(set(targets)):
        return []
    head = re.escape(prefixes.pop()) + r"\." + _alternatives(idx) + r"\."
    leaves = {r.rpartition(".")[2] for r in rests}
    return [head + r"(?:.*\.)?" + _alternatives(re.escape(x) for x in leaves),
            head + _alternatives(re.escape(r) for r in rests)]


def target_modules_value(model: nn.Module, targets) -> list[str] | str:
    """The `target_modules` to write for LoRA layers at the full module paths `targets` (see the module doc)."""
    targets = sorted(targets)
    want, names = set(targets), base_module_names(model)
    leaves = sorted({t.rpartition(".")[2] for t in targets})
    for candidate in [leaves, *_layer_regexes(targets)]:
        if _peft_selects(candidate, names) == want:
            return candidate
    return targets


def peft_config_dict(model: nn.Module, cfg=None, base_model_name_or_path: str | None = None,
                     overrides: dict | None = None) -> dict:
    """The adapter_config.json contents for the LoRA-family adapter currently in `model`.

    Everything is read off the built layers (so it is right even after `load_peft`); `cfg`, when given,
    only sets which r/alpha are the defaults, the rest going to rank_pattern/alpha_pattern. `overrides`
    lets sibling methods set their fields (DoRA: {"use_dora": True}).
    """
    targets, extra_names = _split(model)
    if not targets:
        raise TunelabError("export: the model has no LoRA layers; wrap it first")
    if len({bool(m.use_rslora) for m in targets.values()}) > 1:
        raise TunelabError("export: mixed LoRA and rsLoRA layers cannot be written as one PEFT config")
    layers = list(targets.values())
    r = cfg.r if cfg is not None else _mode(m.r for m in layers)
    alpha = cfg.alpha if cfg is not None else _mode(m.alpha for m in layers)
    # Per-module r/alpha as actually built (escaped full names, so PEFT's regex lookup is exact).
    rank_pattern = {re.escape(n): m.r for n, m in targets.items() if m.r != r}
    alpha_pattern = {re.escape(n): m.alpha for n, m in targets.items() if m.alpha != alpha}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if base_model_name_or_path:
        from ..models.load import ecosystem_ref

        base_model_name_or_path = ecosystem_ref(base_model_name_or_path)
    conf = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _mode(float(getattr(m.lora_dropout, "p", 0.0)) for m in layers),
        "use_rslora": bool(layers[0].use_rslora),
        "target_modules": target_modules_value(model, targets),
        "modules_to_save": sorted(extra_names) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # Only claim tying when a tied pair is really trained fully; PEFT warns otherwise.
        "ensure_weight_tying": bool(tied_groups(model, extra_names)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
    }
    conf.update(overrides or {})
    return conf


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT key names, each tied name written (safetensors forbids shared memory,
    so every tensor is an independent contiguous CPU copy)."""
    return {PREFIX + k: p.detach().to("cpu", copy=True).contiguous()
            for k, p in base.adapter_parameters(model, dedup=False).items()}


def save_peft(model: nn.Module, cfg, path: str | Path, base_model_name_or_path: str | None = None,
              overrides: dict | None = None) -> Path:
    """Write the adapter in `model` as a PEFT adapter folder at `path` (config + safetensors)."""
    path = Path(path)
    conf = peft_config_dict(model, cfg, base_model_name_or_path, overrides)
    path.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(model), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return path


def read_peft(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors with the PEFT prefix stripped), validated to be a plain LoRA adapter."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise TunelabError(f"{path}: no {CONFIG_FILE} here; not a PEFT adapter folder")
    if not weights.is_file():
        extra = " (only adapter_model.bin: pickle is not loaded; re-save with safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise TunelabError(f"{path}: no {WEIGHTS_FILE}{extra}")
    try:
        conf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise TunelabError(f"{cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if conf.get("peft_type") != "LORA":
        raise TunelabError(f"{cfg_file}: peft_type '{conf.get('peft_type')}' is not supported; tunelab imports LORA")
    for key, neutral in _UNSUPPORTED:
        value = conf.get(key, neutral)
        if value not in (neutral, None, False, {}, []):
            raise TunelabError(f"{cfg_file}: {key}={value!r} is not supported by tunelab's LoRA")
    tensors = {}
    for key, t in load_file(str(weights)).items():
        if not key.startswith(PREFIX):
            raise TunelabError(f"{weights}: key '{key}' lacks the '{PREFIX}' prefix of a PEFT causal-LM adapter")
        tensors[key[len(PREFIX):]] = t
    return conf, tensors


def _classify(tensors: dict[str, torch.Tensor], where: str, suffixes: tuple[str, ...]):
    """(LoRA target -> rank from lora_A's shape, module names trained fully)."""
    ranks: dict[str, int] = {}
    extra: dict[str, None] = {}
    for key, t in tensors.items():
        if ".lora_" in key:
            module, _, rest = key.partition(".lora_")
            if f"lora_{rest}" not in suffixes:
                raise TunelabError(f"{where}: tensor '{key}' (lora_{rest}) is not supported by tunelab's LoRA")
            if rest == "A.weight":
                ranks[module] = int(t.shape[0])
        else:
            extra[key.rpartition(".")[0]] = None
    return ranks, list(extra)


def untied_keys(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`tensors` (a file's, every tied name written) keyed as `base.adapter_state_dict` keys them: a tied pair of
    fully trained modules once, under the first name in model order; the two copies must agree."""
    params = base.adapter_parameters(model)
    every = base.adapter_parameters(model, dedup=False)
    sd: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key in every and key not in params:  # the tied partner of an already-listed weight
            twin = next(n for n, p in params.items() if p is every[key])
            if twin in tensors and not torch.equal(tensors[twin], t):
                raise TunelabError(f"{where}: '{key}' and '{twin}' are tied in the model but differ in the file")
            sd.setdefault(twin, t)
        else:
            sd[key] = t
    return sd


def load_peft(model: nn.Module, path: str | Path):
    """Wrap `model` with the LoRA adapter in PEFT folder `path`; outputs equal PEFT's for the same adapter.

    Targets and modules_to_save come from the tensor keys (exact, whatever regex the config used); ranks
    from the tensor shapes. A tied embedding saved without `ensure_weight_tying` is untied, as PEFT does.
    `use_dora: true` dispatches to the "dora" method (its Config must accept LoraConfig's fields).
    """
    conf, tensors = read_peft(path)
    where = str(Path(path) / WEIGHTS_FILE)
    method = "dora" if conf.get("use_dora") else "lora"
    try:
        mod = base.get_method(method)
    except TunelabError:
        raise TunelabError(f"{Path(path) / CONFIG_FILE}: use_dora adapters need tunelab's '{method}' method, "
                           "which is not available") from None
    ranks, extra_names = _classify(tensors, where, mod.PEFT_SUFFIXES)
    if not ranks:
        raise TunelabError(f"{where}: no lora_A/lora_B tensors; nothing to import")
    r = int(conf.get("r", 8))
    cfg = mod.Config(
        r=r, alpha=float(conf.get("lora_alpha", 8)), dropout=float(conf.get("lora_dropout") or 0.0),
        use_rslora=bool(conf.get("use_rslora", False)), target_modules=sorted(ranks),
        modules_to_save=extra_names, ensure_weight_tying=bool(conf.get("ensure_weight_tying", False)),
        # Shapes are authoritative for r; full names first so they win PEFT's first-match lookup.
        rank_pattern={**{re.escape(n): k for n, k in ranks.items() if k != r}, **(conf.get("rank_pattern") or {})},
        alpha_pattern=dict(conf.get("alpha_pattern") or {}))
    try:
        report = mod.wrap(model, cfg)
    except TunelabError as e:
        raise TunelabError(f"{path}: {e}") from None

    base.load_adapter_state_dict(model, untied_keys(model, tensors, where), source=where)
    report.notes.append(f"imported PEFT adapter {path}")
    return report

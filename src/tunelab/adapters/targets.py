"""Which modules an adapter targets: user patterns and the "all-linear" preset, resolved to module names.

`match_modules(model, patterns, what=...)` resolves user patterns to full module names. A pattern matches a
module name when ANY of these hold (so users can write what they are used to):

* suffix on a dot boundary: ``q_proj`` matches ``model.layers.0.self_attn.q_proj``; a full name matches itself;
* fnmatch glob over the full name: ``model.layers.1*.mlp.*``;
* regex ``re.fullmatch`` over the full name: ``.*\\.(q|v)_proj``.

The preset ``"all-linear"`` means every `nn.Linear` inside the decoder stack (the `nn.ModuleList` holding
the most parameters, e.g. ``model.layers``), so the output head ``lm_head`` is excluded, and MoE routers
(leaf names ``gate``, ``router``, ``shared_expert_gate``) are excluded as well: a low-rank update to a
router reshuffles expert choice, rarely what one wants. Explicit patterns are never filtered.
A pattern that matches nothing is a user error naming the pattern.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from torch import nn

from ..errors import TunelabError

ALL_LINEAR = "all-linear"
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def pattern_value(patterns: dict, name: str, default):
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: the first key `k` with re.match(r'(.*\\.)?(k)$', name)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ----------------------------------------------------------------------------------------- matching
def pattern_matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # a glob like "layers.[0" is not a valid regex; that interpretation just fails
        return False


def decoder_stack(model: nn.Module) -> str | None:
    """Name of the `nn.ModuleList` with the most parameters: the decoder blocks in every HF causal LM."""
    best, best_n = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            n = sum(p.numel() for p in module.parameters())
            if n > best_n:
                best, best_n = name, n
    return best


def is_router(name: str) -> bool:
    return name.rpartition(".")[2] in ROUTER_NAMES


def _example_leaves(model: nn.Module, kinds: tuple[type, ...], limit: int = 8) -> str:
    leaves: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if name and not leaf.isdigit() and isinstance(module, kinds) and leaf not in leaves:
            leaves.append(leaf)
    return ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")


def match_modules(model: nn.Module, patterns: str | Iterable[str], *, what: str,
                  kinds: tuple[type, ...] | None = (nn.Linear,)) -> list[str]:
    """Resolve `patterns` (or "all-linear") to full module names, in model order.

    `kinds` restricts matches to module types the method can wrap (None = any module). Each pattern must
    match at least one module of those kinds, else TunelabError names the pattern and lists real names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise TunelabError(f"{what}: empty list; give module names like q_proj or '{ALL_LINEAR}'")
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen: dict[str, None] = {}  # ordered set
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            stack = decoder_stack(model)
            prefix = f"{stack}." if stack else ""
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            hits = [n for n, m in named if isinstance(m, nn.Linear) and n.startswith(prefix)
                    and not is_router(n) and m is not head]
        else:
            hits = [n for n, m in named if pattern_matches(pattern, n)]
            typed = [n for n in hits if kinds is None or isinstance(model.get_submodule(n), kinds)]
            if hits and not typed:
                kind = type(model.get_submodule(hits[0])).__name__
                raise TunelabError(f"{what}: pattern '{pattern}' matches only modules this method cannot wrap "
                                   f"({hits[0]} is a {kind}); linear modules are e.g. "
                                   f"{_example_leaves(model, kinds or (nn.Linear,))}")
            hits = typed
        if not hits:
            sort = "linear" if kinds == (nn.Linear,) else "matching"
            raise TunelabError(f"{what}: pattern '{pattern}' matches no module; {sort} modules are e.g. "
                               f"{_example_leaves(model, kinds or (nn.Module,))}")
        chosen.update(dict.fromkeys(hits))
    return list(chosen)

"""``${STAGE:<name>}`` — a pipeline stage using an earlier stage's output — and the config lines errors name.

    data: {train: "${STAGE:rm_pairs}/pairs.jsonl"}                  # a data stage's file
    rl: {rewards: [{name: reward_model, run_dir: "${STAGE:rm}"}]}    # a reward-model stage's run
    ppo: {value_init: "${STAGE:rm}"}

A reference becomes the named stage's folder, ``<output_dir>/<name>``. Before anything runs, the pipeline
checks every reference (train/pipeline.py): the stage exists, comes earlier, and — for a data stage — the file
named after it is one that stage writes; a reward model's ``run_dir`` names a ``reward`` stage. A policy is
named by ``from: <stage>`` instead (its weights' folder is known only once it has trained). A wrong reference is
one line with the config file's line when the file is known: ``llama3.yaml:41: stages[3] (rm): ${STAGE:pairs}:
no stage named 'pairs' (stages: sft, rm_pairs, …)``.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

TOKEN = re.compile(r"\$\{STAGE:([^}]*)\}(/[^\s\"']*)?")


def references(node, path: tuple = ()) -> list[tuple[tuple, str, str]]:
    """Every ``${STAGE:name}`` in a config tree: (key path, stage name, what follows it, e.g. ``/pairs.jsonl``)."""
    if isinstance(node, dict):
        return [r for k, v in node.items() for r in references(v, path + (str(k),))]
    if isinstance(node, list):
        return [r for i, v in enumerate(node) for r in references(v, path + (i,))]
    if isinstance(node, str):
        return [(path, m.group(1), m.group(2) or "") for m in TOKEN.finditer(node)]
    return []


def substitute(node, root: Path):
    """The config tree with every ``${STAGE:name}`` replaced by ``<root>/<name>``."""
    if isinstance(node, dict):
        return {k: substitute(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, root) for v in node]
    if isinstance(node, str):
        return TOKEN.sub(lambda m: str(root / m.group(1)) + (m.group(2) or ""), node)
    return node


class ConfigLines:
    """Where a stage's keys sit in the pipeline's config file, for ``file:line:`` prefixes (empty without a file
    or for a file that no longer parses)."""

    def __init__(self, source: str | Path | None):
        self.source, self.stages, self.root = source, [], None
        if source is None:
            return
        try:
            self.root = yaml.compose(Path(source).read_text())
        except (OSError, yaml.YAMLError):
            return
        node = _child(self.root, "stages")
        if isinstance(node, yaml.SequenceNode):
            self.stages = node.value

    def at(self, i: int | None, path: tuple = ()) -> str:
        """``"<file>:<line>: "`` of the deepest part of `path` found in stage i (i None: the top level); the
        stage's own line when none of it is; ``""`` when the file is unknown."""
        node = self.root if i is None else (self.stages[i] if i < len(self.stages) else None)
        if node is None:
            return ""
        line = node.start_mark.line
        for key in path:
            child = _child(node, key)
            if child is None:
                break
            line, node = child.start_mark.line, child
        return f"{self.source}:{line + 1}: "


def _child(node, key):
    if isinstance(node, yaml.MappingNode):
        return next((v for k, v in node.value if k.value == str(key)), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        return node.value[key]
    return None

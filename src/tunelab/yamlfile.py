"""YAML the user gives — run configs, pipelines, sweep/study files, task files, a run's saved config — read by one
loader that is safe and bounded, so a hostile or broken file costs a one-line error, not the machine.

    data = load_yaml(text, "c.yaml")                       # plain data (dicts, lists, scalars)
    data, lines = load_yaml_lines(text, "c.yaml")          # + {("train", "lr"): 5, ...} for error messages

What it refuses, each as one `TunelabError` line naming ``file:line``:

- **tags that build objects** (``!!python/object``): only YAML's plain types are constructed (`yaml.SafeLoader`).
- **alias bombs** ("billion laughs": ``a: &a [x, x]``, ``b: &b [*a, *a]``, … nine levels deep is 2⁹ lists per
  alias). An alias is a reference, cheap to parse, but everything that walks the data afterwards (validation,
  substitution, copies) visits it once per reference. Each node's *expanded* size (itself plus everything it
  contains, aliases counted in full) is computed while composing, and the nodes that aliases add beyond those
  written out are capped at `ALIAS_BUDGET` — generous for a config that reuses a few sections, instantly
  exceeded by a bomb. Merge keys (``<<: *a``) copy through aliases, so the same count bounds them.
- **an alias inside its own anchor** (``&a [*a]``): a cycle no consumer could walk.
- **nesting deeper than `MAX_DEPTH`** (``[[[[…]]]]`` 200,000 deep would otherwise end in a RecursionError).
- **files over `MAX_BYTES`** (large data belongs in a .jsonl file).

Aliased nodes are constructed once and shared, never copied; `1e-4` (a float in YAML 1.2 and to every user, a
string in YAML 1.1) is read as a float when written plain (``floats=True``, configs), while a quoted ``'1e-4'``
stays a string.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import TunelabError

ALIAS_BUDGET = 100_000  # nodes that aliases may add beyond the nodes written in the file
MAX_DEPTH = 100  # nested collections; tunelab's configs use 4
MAX_BYTES = 32 * 1024 * 1024


class _Refused(yaml.YAMLError):
    def __init__(self, mark, message: str):
        super().__init__(message)
        self.problem_mark, self.problem = mark, message


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts, while composing, the nesting depth and the nodes aliases add (module docstring)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._size: dict[int, int] = {}  # id(node) → expanded size, once the node is complete
        self._added = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:  # an unknown alias: yaml's own error
                if id(node) not in self._size:
                    raise _Refused(event.start_mark, f"YAML alias *{event.anchor} refers to a node that contains it")
                self._added += self._size[id(node)]
                if self._added > ALIAS_BUDGET:
                    raise _Refused(event.start_mark, f"YAML aliases expand to over {ALIAS_BUDGET:,} nodes (an alias "
                                                     "bomb?); write the values out or use fewer aliases")
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(self.peek_event().start_mark, f"YAML nested over {MAX_DEPTH} levels deep")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._size[id(c)] for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._size[id(k)] + self._size[id(v)] for k, v in node.value)
        else:
            size = 1
        self._size[id(node)] = size
        return node


class _ConfigLoader(_BoundedLoader):
    """+ ``1e-4``, ``1E5``, ``2.5e3`` as floats when plain (YAML 1.1 wants a dot and a signed exponent)."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _compose(text: str, shown: str, floats: bool):
    if len(text) > MAX_BYTES:
        raise TunelabError(f"{shown}: {len(text) / 2**20:.0f} MB, over the {MAX_BYTES // 2**20} MB limit for a "
                           "YAML file (put large data in a .jsonl file)")
    loader = None
    try:
        loader = (_ConfigLoader if floats else _BoundedLoader)(text)  # its reader refuses control characters
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _Refused as e:
        raise TunelabError(f"{shown}:{e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}" if mark else shown
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TunelabError(f"{where}: invalid YAML ({problem})") from None
    except RecursionError:  # a limit above should always come first; never a traceback regardless
        raise TunelabError(f"{shown}: invalid YAML (nested too deeply)") from None
    finally:
        if loader is not None:
            loader.dispose()
    return node, data


def load_yaml(text: str, shown: str, floats: bool = False) -> Any:
    """The data of YAML `text` (`shown` names it in errors), bounded as the module docstring says."""
    return _compose(text, shown, floats)[1]


def load_yaml_lines(text: str, shown: str, floats: bool = False) -> tuple[Any, dict[tuple[str, ...], int]]:
    """(data, {dotted key path: 1-based line}) — each mapping key's line, and each list item's (its index as the
    path part, ``("claims", "1", "margin")``), for errors that name a key. A node reached again through an alias
    is not walked again (its keys keep the lines of where they are written)."""
    node, data = _compose(text, shown, floats)
    lines: dict[tuple[str, ...], int] = {}
    seen: set[int] = set()
    stack = [(node, ())]
    while stack:
        n, path = stack.pop()
        if not isinstance(n, (yaml.MappingNode, yaml.SequenceNode)) or id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines.setdefault(path + (str(i),), item.start_mark.line + 1)
                stack.append((item, path + (str(i),)))
            continue
        for k, v in n.value:
            p = path + (str(k.value),)
            lines.setdefault(p, k.start_mark.line + 1)
            stack.append((v, p))
    return data, lines

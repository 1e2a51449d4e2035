"""The package's import graph: no cycles (function-level imports included) and no module importing another
module's private (`_`) names."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, [names]) for every import statement in `path`, relative imports resolved."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _graph():
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        deps = set()
        for target, names in _imports(path):
            for name in names:  # `from pkg import module` imports a module
                if f"{target}.{name}" in modules:
                    deps.add(f"{target}.{name}")
            if target in modules:
                deps.add(target)
        graph[mod] = deps - {mod}
    return modules, graph


def test_no_import_cycles():
    _, graph = _graph()
    # a package's __init__ re-exporting its own submodules is not a cycle through that package
    graph = {m: {d for d in deps if not (m.startswith(d + ".") and d in graph)} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    modules, _ = _graph()
    bad = []
    for mod, path in modules.items():
        for target, names in _imports(path):
            if target.startswith("tunelab") and target != mod:
                bad += [f"{mod} imports {target}.{n}" for n in names if n.startswith("_") and n != "__future__"]
    assert not bad, "\n".join(bad)


LAYERS = [("tunelab.errors", "tunelab.console", "tunelab.config", "tunelab"), ("tunelab.data",), ("tunelab.models",),
          ("tunelab.adapters",), ("tunelab.objectives",), ("tunelab.sampling", "tunelab.generate"), ("tunelab.eval",), ("tunelab.rl",),
          ("tunelab.train",), ("tunelab.export", "tunelab.gguf_export"), ("tunelab.chat", "tunelab.serve"), ("tunelab.lab",), ("tunelab.cli", "tunelab.cli_args", "tunelab.cli_export", "tunelab.examples", "tunelab.__main__")]


def _layer(mod: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return best[0]


def test_imports_only_go_down_the_path():
    """docs/architecture.md's order: a module imports only from its own layer or the layers above it."""
    _, graph = _graph()
    # the one exception: config.py's schema embeds each method's options class, which lives with its method
    allowed = {(m, d) for m in ("tunelab.config",) for d in graph if d.startswith("tunelab.adapters.")}
    up = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
          if d != "tunelab" and _layer(d) > _layer(m) and (m, d) not in allowed]
    assert not up, "\n".join(sorted(up))

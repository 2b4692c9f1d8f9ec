"""The package's shape: layers import one way, no import cycles, argparse only in the CLI, small modules.

Read from the source with `ast` (every import, also those inside functions), so a test fails
the day someone adds an upward import, not the day it first bites.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "monossl"

# layer of each top-level part of the package: a module may import its own layer and those below
LAYERS = {
    "__init__": 0, "errors": 0, "seeds": 0, "paper": 0, "runs": 0, "device": 0, "distributed": 0,
    "data": 1, "models": 1,
    "methods": 2,
    "train": 3, "tracking": 3,
    "pretrain": 4,
    "eval": 5, "viz": 5,
    "experiments": 6,
    "cli": 7,
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str) -> set[str]:
    """Every monossl module `path` imports, at top level or inside a function."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("monossl")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.startswith("monossl"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}  # `from monossl import runs` imports a module
    modules = _modules()
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return LAYERS[part]


def test_every_part_of_the_package_has_a_layer():
    assert {(m.split(".")[1] if "." in m else "__init__") for m in _modules()} <= set(LAYERS)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
              for name, path in _modules().items() for dep in sorted(_imports(path, name))
              if _layer(dep) > _layer(name)]
    assert upward == []


def test_no_import_cycles():
    graph = {name: _imports(path, name) for name, path in _modules().items()}
    # a package's __init__ is imported by its submodules implicitly: not an edge we draw

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    return trail + [dep]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, trail + [dep]))
        return None

    cycles = [" -> ".join(c) for c in map(cycle_from, graph) if c]
    assert cycles == []


def test_argparse_lives_in_the_cli_package_only():
    users = [name for name, path in _modules().items()
             if not name.startswith("monossl.cli") and "argparse" in {
                 a.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
                 for a in node.names}]
    assert users == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_are_small(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it along its seams"


def test_the_checker_sees_upward_and_lazy_imports(tmp_path):
    """The import reader is not blind: it finds a lazy import inside a function, and a from-import of a module."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from monossl.viz import plots\n    import monossl.experiments.compare\n")
    assert {"monossl.viz.plots", "monossl.experiments.compare"} <= _imports(source, "monossl.data.x")

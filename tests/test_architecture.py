"""The package layers of docs/architecture.md, checked on the source (no import is executed).

A package imports only packages of a lower layer; packages of one layer never import each other;
no module imports a private name of another module; the module graph has no cycle; no package
holds half of the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Layer of each package (higher imports lower; equal never import each other).
LAYERS = {
    "cxr_io": 0,
    "evaluation": 1,
    "synthetic": 1,
    "segmentation": 2,
    "classification": 2,
    "pipeline": 3,
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


MODULES = _modules()


def _project_target(name: str, names: list[str]) -> list[str]:
    """The project modules an import statement reaches (``from pkg import mod`` -> ``pkg.mod``)."""
    if name.split(".")[0] not in LAYERS:
        return []
    targets = [f"{name}.{n}" for n in names if f"{name}.{n}" in MODULES]
    return targets or [name]


def test_no_package_imports_a_higher_or_sibling_layer():
    bad = []
    for module, path in MODULES.items():
        src_pkg = module.split(".")[0]
        for name, _, line in _imports(path, module):
            dst_pkg = name.split(".")[0]
            if dst_pkg in LAYERS and dst_pkg != src_pkg and LAYERS[dst_pkg] >= LAYERS[src_pkg]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for module, path in MODULES.items():
        for name, names, line in _imports(path, module):
            if name.split(".")[0] in LAYERS and name != module:
                private = [n for n in names if n.startswith("_")]
                if private:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {name}")
    assert not bad, "\n".join(bad)


def test_module_graph_has_no_cycle():
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, names, _ in _imports(path, module):
            for target in _project_target(name, names):
                if target in MODULES and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    # a package's __init__ re-exporting its modules is not a cycle with them
    for module in graph:
        graph[module] = {t for t in graph[module] if t != module.split(".")[0]}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_package_holds_half_of_the_code():
    lines = {
        pkg: sum(len(p.read_text().splitlines()) for p in (ROOT / pkg).rglob("*.py"))
        for pkg in LAYERS
    }
    total = sum(lines.values())
    biggest = max(lines, key=lines.get)
    assert lines[biggest] < 0.4 * total, f"{biggest} holds {lines[biggest]} of {total} lines"


def test_the_checker_sees_a_violation(tmp_path):
    """The AST reader finds function-level imports too (most upward edges hid there)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pipeline.study import run_study\n")
    assert _imports(f, "cxr_io.m") == [("pipeline.study", ["run_study"], 2)]

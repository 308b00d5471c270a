"""The layering rules of docs/architecture.md, checked on the source: what may import what, and no circles.

`core` is the bottom (pure: no I/O, imports no other layer); `gateway` and `neuron` stand side by
side and never import each other; `cli` sits on top and nothing imports it. Module-level imports
form no circle (a circle means two modules are one idea, or one is in the wrong place).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cortex"

# layer -> layers it must never import
FORBIDDEN = {
    "core": {"gateway", "neuron", "cli", "hardening"},
    "gateway": {"neuron", "cli"},
    "neuron": {"gateway", "cli"},
    "hardening": {"gateway", "neuron", "cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, module_level_only: bool) -> set[str]:
    """The cortex modules a file imports (`from cortex.x import y` counts `cortex.x.y` when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = []
    if module_level_only:
        for node in tree.body:
            is_type_checking = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            if not is_type_checking:
                nodes.extend(ast.walk(node))
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cortex."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cortex"):
            found.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (SRC / candidate.replace(".", "/")).with_suffix(".py").exists():
                    found.add(candidate)
    return found


def type_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module and inner.module.startswith("cortex"):
                    found.add(inner.module)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_layers_import_only_what_they_may() -> None:
    broken = []
    for path in sources():
        own = layer(module_name(path))
        for target in imports(path, module_level_only=False):
            if layer(target) in FORBIDDEN.get(own, set()):
                broken.append(f"{module_name(path)} imports {target}")
    assert broken == []


def test_no_import_circles() -> None:
    # Imports for type checking count too: a circle hidden behind TYPE_CHECKING is still one idea in two places.
    graph = {module_name(p): imports(p, module_level_only=True) | type_imports(p) for p in sources()}
    modules = set(graph)
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, set()) & modules):
            if target == node or target.startswith(node + "."):
                continue  # a package importing its own submodules is not a circle
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert circles == []

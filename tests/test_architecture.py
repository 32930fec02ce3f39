"""The layout's rules, read from the source: rooms that import each other one way only.

Every import is counted, also those inside functions: a function-level import hides a cycle from
Python's import machinery, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"common": "cldlr.common", "client": "cldlr.client", "server": "cldlr.server",
         "simulations": "cldlr.simulations", "cldlr": "cldlr"}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [ROOTS[rel.parts[0]], *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for root in ROOTS for p in (REPO / root).rglob("*.py")}
    assert len(found) > 50, found  # the walk found the package
    return found


MODULES = modules()


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every import in the file, resolved to absolute names."""
    name = module_name(path)
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target, None, node.lineno) if target in MODULES else (base, alias.name, node.lineno))
    return found


def internal_edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in imports(path):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def test_no_module_imports_a_private_name_of_another() -> None:
    private = [f"{MODULES[m].relative_to(REPO)}:{line} imports {target}.{name}"
               for m in MODULES for target, name, line in imports(MODULES[m])
               if name and name.startswith("_") and not name.startswith("__") and target.startswith("cldlr")]
    assert private == []


def test_no_import_cycle_even_through_function_level_imports() -> None:
    graph = internal_edges()
    # a package's __init__ re-exporting its modules is not a cycle through its modules
    graph = {m: {t for t in targets if not (MODULES[t].stem == "__init__" and m.startswith(t + "."))}
             for m, targets in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


CLI = tuple(f"cldlr.{p.stem}" for p in (REPO / "cldlr").glob("cli*.py"))


def inside(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


@pytest.mark.parametrize(("room", "forbidden"), [
    ("cldlr.common", ("cldlr.client", "cldlr.server", "cldlr.simulations", *CLI)),
    ("cldlr.client", ("cldlr.server", "cldlr.simulations", *CLI)),
    ("cldlr.server", ("cldlr.client", "cldlr.simulations", *CLI)),
])
def test_rooms_import_one_way(room: str, forbidden: tuple[str, ...]) -> None:
    wrong = [f"{m} imports {t}" for m, targets in internal_edges().items() if inside(m, room)
             for t in targets if any(inside(t, f) for f in forbidden)]
    assert wrong == []


def test_common_imports_flower_in_one_file_only() -> None:
    flower = sorted(str(MODULES[m].relative_to(REPO)) for m in MODULES if m.startswith("cldlr.common")
                    if any(t == "flwr" or t.startswith("flwr.") for t, _, _ in imports(MODULES[m])))
    assert flower == ["common/secure/wire.py"]

"""Find import cycles among a package's own modules.

    python scripts/import_cycles.py [PACKAGE_DIR]     (default: lightning_qlora)

Parses every module with `ast` (nothing is imported) and draws an arrow for each import of another module
of the package: `import a.b`, `from a import b` (to the module `a.b` when it is one, else to `a`), and
relative imports. Imports are counted in three kinds:

- module level: run when the module is imported (class bodies and try/if blocks included);
- function level: inside a function, run on first call (a deferred import, often used to break a cycle);
- type checking: under `if TYPE_CHECKING:`, never run.

A cycle of module-level imports makes the order of imports matter (a module half-initialised when its
partner asks for a name), so it is an error: the exit status is 1. Listed apart, for information: cycles
closed only by function-level imports, cycles closed only by type-checking imports, and back arrows (a
shared private helper at the top of the package, `pkg._x`, importing a module of a subpackage).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MODULE, FUNCTION, TYPE_CHECKING = "module", "function", "type-checking"


@dataclass
class Graph:
    modules: set[str] = field(default_factory=set)
    # kind -> importer -> imported modules
    edges: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: {MODULE: {}, FUNCTION: {}, TYPE_CHECKING: {}}
    )

    def add(self, kind: str, importer: str, imported: str) -> None:
        if imported != importer:
            self.edges[kind].setdefault(importer, set()).add(imported)

    def count(self, kind: str) -> int:
        return sum(len(targets) for targets in self.edges[kind].values())


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file, for every .py file under the package (`__init__.py` names the package)."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[tuple[str, ast.Import | ast.ImportFrom]]:
    """Each import statement with its kind."""

    def walk(node: ast.AST, kind: str) -> Iterator[tuple[str, ast.Import | ast.ImportFrom]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield kind, child
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, TYPE_CHECKING if kind == TYPE_CHECKING else FUNCTION)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), TYPE_CHECKING)
                for statement in child.orelse:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), kind)
            else:
                yield from walk(child, kind)

    yield from walk(tree, MODULE)


def _targets(statement: ast.Import | ast.ImportFrom, importer: str, is_package: bool,
             modules: set[str]) -> Iterator[str]:  # fmt: skip
    """The package's modules that one import statement imports."""
    if isinstance(statement, ast.Import):
        for alias in statement.names:
            if alias.name in modules:
                yield alias.name
        return
    base = statement.module or ""
    if statement.level:
        parts = importer.split(".")
        if not is_package:
            parts.pop()
        parts = parts[: len(parts) - (statement.level - 1)]
        base = ".".join([*parts, base] if base else parts)
    for alias in statement.names:
        submodule = f"{base}.{alias.name}"
        if submodule in modules:
            yield submodule
        elif base in modules:
            yield base


def build_graph(package_dir: Path) -> Graph:
    names = module_names(package_dir)
    graph = Graph(modules=set(names))
    for name, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for kind, statement in _imports(tree):
            for target in _targets(statement, name, path.name == "__init__.py", graph.modules):
                graph.add(kind, name, target)
    return graph


def _shortest_cycle(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    """The shortest path start -> ... -> start, by breadth-first search."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each module that lies on a cycle, each cycle listed once."""
    found: dict[frozenset[tuple[str, str]], list[str]] = {}
    for start in sorted(edges):
        cycle = _shortest_cycle(start, edges)
        if cycle is not None:
            found.setdefault(frozenset(itertools.pairwise(cycle)), cycle)
    return sorted(found.values(), key=lambda c: (len(c), c))


def _merged(*graphs: dict[str, set[str]]) -> dict[str, set[str]]:
    merged: dict[str, set[str]] = {}
    for graph in graphs:
        for importer, targets in graph.items():
            merged.setdefault(importer, set()).update(targets)
    return merged


def _is_shared_helper(module: str, package: str) -> bool:
    """A private module at the top of the package (`pkg._names`): everything may import it, it imports
    only its like."""
    parent, _, name = module.rpartition(".")
    return parent == package and name.startswith("_")


def _short(cycle: list[str], package: str) -> str:
    return " -> ".join(name.removeprefix(package + ".") for name in cycle)


def _cycles_needing(kinds: tuple[str, ...], graph: Graph) -> list[list[str]]:
    """Cycles among the imports of `kinds` that use at least one import of the last kind."""
    weaker = {(a, b) for kind in kinds[:-1] for a, targets in graph.edges[kind].items() for b in targets}
    return [
        cycle
        for cycle in cycles(_merged(*(graph.edges[kind] for kind in kinds)))
        if any(edge not in weaker for edge in itertools.pairwise(cycle))
    ]


def report(graph: Graph, package: str) -> tuple[str, int]:
    """The printed report and the number of module-level cycles."""
    module_cycles = cycles(graph.edges[MODULE])
    deferred = _cycles_needing((MODULE, FUNCTION), graph)
    typing_only = _cycles_needing((MODULE, FUNCTION, TYPE_CHECKING), graph)
    back_arrows = sorted(
        f"{kind}: {_short([a, b], package)}"
        for kind in (MODULE, FUNCTION)
        for a, targets in graph.edges[kind].items()
        if _is_shared_helper(a, package)
        for b in targets
        if not _is_shared_helper(b, package) and b != package
    )
    lines = [
        f"{package}: {len(graph.modules)} modules; imports of its own modules: "
        f"{graph.count(MODULE)} module-level, {graph.count(FUNCTION)} function-level, "
        f"{graph.count(TYPE_CHECKING)} type-checking only",
        f"module-level cycles: {len(module_cycles)}",
        *(f"  {_short(cycle, package)}" for cycle in module_cycles),
        f"cycles closed by function-level imports (deferred, not an error): {len(deferred)}",
        *(f"  {_short(cycle, package)}" for cycle in deferred),
        f"cycles closed by type-checking imports (never run, not an error): {len(typing_only)}",
        *(f"  {_short(cycle, package)}" for cycle in typing_only),
        f"back arrows, a shared helper ({package}._*) importing a subpackage (not an error): "
        f"{len(back_arrows)}",
        *(f"  {arrow}" for arrow in back_arrows),
    ]
    return "\n".join(lines), len(module_cycles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "lightning_qlora"
    parser.add_argument("package_dir", nargs="?", type=Path, default=default)
    args = parser.parse_args(argv)
    package_dir: Path = args.package_dir.resolve()
    if not (package_dir / "__init__.py").is_file():
        parser.error(f"{package_dir} is not a package (no __init__.py)")
    text, n_cycles = report(build_graph(package_dir), package_dir.name)
    print(text)
    return 1 if n_cycles else 0


if __name__ == "__main__":
    sys.exit(main())

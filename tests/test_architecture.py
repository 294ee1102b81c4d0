"""The layout holds: no import cycles between the modules of `autorefine/` and `retriever_server/`, and the
library never imports the app, the dev bench or the tests.

The graph is built from the source with `ast`: every `import`, at module level or inside a function (a lazy
import still runs, only later), including those under `TYPE_CHECKING`. Importing `a.b.c` also runs the
`__init__` of `a` and `a.b` (unless the importer sits inside them, where they already run), so those count as
edges too: a package `__init__` that re-exports a module which imports back into the package is a cycle at
run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO_ROOT

LIBRARY = ("autorefine", "retriever_server")
NOT_LIBRARY = ("demo", "testbed", "tests", "benchmarks", "scripts")


def modules(packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name → file, for every module of `packages` (a package under its own name)."""
    found = {}
    for package in packages:
        for path in (REPO_ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name `path` imports (absolute; relative imports resolved against `module`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    base = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            root = node.module or ""
            if node.level:
                parts = base.split(".")
                root = ".".join(parts[: len(parts) - node.level + 1] + ([root] if root else []))
            names.add(root)
            names.update(f"{root}.{alias.name}" for alias in node.names)
    return names


def import_graph(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the modules it runs on import (including the `__init__` of every package on the way)."""
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target in imported_names(path, name):
            while target and target not in known:  # `from pkg.mod import Class` → pkg.mod
                target = target.rpartition(".")[0]
            while target:  # pkg.mod runs pkg/__init__.py first, unless pkg is this module's own package
                if target != name and target in known and not name.startswith(target + "."):
                    graph[name].add(target)
                target = target.rpartition(".")[0]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_library_has_no_import_cycle():
    cycle = find_cycle(import_graph(modules(LIBRARY)))
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_package_init(tmp_path):
    graph = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p"}, "q": set()}
    assert find_cycle(graph) == ["p", "p.a", "p.b", "p"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_package_inits_count_as_imported(tmp_path):
    known = {"pkg": tmp_path / "__init__.py", "pkg.mod": tmp_path / "mod.py", "other": tmp_path / "other.py"}
    for path in known.values():
        path.write_text("")
    known["other"].write_text("from pkg.mod import thing\n")
    assert import_graph(known)["other"] == {"pkg", "pkg.mod"}


def test_the_library_imports_no_app_dev_or_test_code():
    known = modules(LIBRARY)
    offending = {
        f"{name} imports {target}"
        for name, path in known.items()
        for target in imported_names(path, name)
        if target.split(".")[0] in NOT_LIBRARY
    }
    assert not offending, sorted(offending)


def test_no_test_module_imports_another_test_module():
    offending = {
        f"{path.name} imports {target}"
        for path in (REPO_ROOT / "tests").glob("*.py")
        for target in imported_names(path, f"tests.{path.stem}")
        if target.startswith("tests.test_")
    }
    assert not offending, sorted(offending)


def test_the_retriever_server_imports_no_trainer_code():
    # The server runs on its own (another node, another venv): training and rollout code must not leak in.
    known = modules(LIBRARY)
    offending = {
        f"{name} imports {target}"
        for name, path in known.items()
        if name.startswith("retriever_server")
        for target in imported_names(path, name)
        if target.startswith(("autorefine.training", "autorefine.rollout", "trl", "vllm"))
    }
    assert not offending, sorted(offending)

"""The package's import graph has no cycle (issue 12: each concept in one module, imported downward).

The graph is read from the source with ``ast``, not by importing: every ``import scoredensity.x`` and ``from .x import
y`` at module level *and* inside functions (a lazy import hides a cycle, it does not remove it), relative imports
resolved against the importing module's package. An import of ``a.b.c`` also runs the package ``a.b``'s
``__init__`` unless the importer already lives inside ``a.b``, so that edge is added too. Imports guarded by
``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

import scoredensity

PACKAGE_ROOT = Path(scoredensity.__file__).resolve().parent


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every ``.py`` file below the package directory ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (they never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def _owner(name: str, modules: dict) -> str | None:
    """The longest prefix of the dotted ``name`` that is a module of the package (None for outside imports)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (module- and function-level), for the package directory ``root``."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_nodes(tree)
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    if node.level - 1 >= len(parts):
                        raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one, else a name of ``pkg``
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for name in names:
                target = _owner(name, modules)
                if target is None or target == mod:
                    continue
                graph[mod].add(target)
                # importing a.b.c first runs the package a.b, unless the importer is already inside it
                parent = target.rpartition(".")[0]
                while parent and not (mod == parent or mod.startswith(parent + ".")):
                    graph[mod].add(parent)
                    parent = parent.rpartition(".")[0]
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a closed path
    ``[m0, m1, ..., m0]`` along import edges so that the failure message shows the cycle to break."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_path(graph, set(c)) for c in comps]


def _cycle_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One closed import path through a strongly connected component (breadth-first back to the start)."""
    start = min(comp)
    prev = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("not a cycle")  # pragma: no cover - a component of size > 1 always has one


def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_package_has_no_import_cycle():
    graph = import_graph(PACKAGE_ROOT)
    assert len(graph) > 30, "the walk found too few modules: the package layout changed"
    assert "scoredensity.formula" in graph["scoredensity.elbo"], "the walk missed a known import"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_walk_sees_lazy_relative_and_package_imports(tmp_path):
    """The detector finds a cycle closed by a function-level relative import, and one closed through a package
    ``__init__`` (importing ``pkg.sub.b`` runs ``pkg/sub/__init__.py`` first)."""
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from .b import f\n",
            "b.py": "def f():\n    from . import a\n    return a\n",
            "c.py": "import pkg.sub.d\n",
            "sub/__init__.py": "from .d import g\nfrom .e import h\n",
            "sub/d.py": "def g():\n    return 1\n",
            "sub/e.py": "from ..c import x\n",
            "typing_only.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n",
        },
    )
    graph = import_graph(root)
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.d"}
    assert graph["pkg.typing_only"] == set()
    cycles = {frozenset(c) for c in find_cycles(graph)}
    assert cycles == {frozenset({"pkg.a", "pkg.b"}), frozenset({"pkg.c", "pkg.sub", "pkg.sub.e"})}
    for cycle in find_cycles(graph):
        assert cycle[0] == cycle[-1]
        assert all(w in graph[v] for v, w in zip(cycle, cycle[1:], strict=False))


def test_relative_import_beyond_the_package_is_reported(tmp_path):
    root = _write_package(tmp_path, {"__init__.py": "", "a.py": "from ... import x\n"})
    with pytest.raises(AssertionError, match="beyond the top-level package"):
        import_graph(root)


# Private names imported across modules before issue 12; each is being made public by its owner. Nothing may join.
_KNOWN_PRIVATE_IMPORTS = {("scoredensity.elbo", "scoredensity.formula", "_resolve_control_variate")}


def private_imports(root: Path) -> set[tuple[str, str, str]]:
    """``(importer, module, name)`` for every ``from <package module> import _name`` in the package below ``root``
    (a private name used outside the module that defines it)."""
    modules = _modules(root)
    found = set()
    for mod, (path, is_pkg) in modules.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if _owner(base, modules) is None:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and base != mod:
                    found.add((mod, base, alias.name))
    return found


def test_no_new_private_imports_across_modules():
    extra = private_imports(PACKAGE_ROOT) - _KNOWN_PRIVATE_IMPORTS
    assert not extra, f"private names imported across modules (make them public): {sorted(extra)}"


def test_private_import_walk_finds_one(tmp_path):
    root = _write_package(
        tmp_path,
        {"__init__.py": "", "a.py": "_x = 1\n", "b.py": "def f():\n    from .a import _x\n    return _x\n"},
    )
    assert private_imports(root) == {("pkg.b", "pkg.a", "_x")}

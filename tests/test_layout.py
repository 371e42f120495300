"""The code layout stays acyclic and keeps its private names private.

The import graph is built from the source with `ast` (every `import`/`from ... import` anywhere in a module:
module level, inside functions, under `TYPE_CHECKING`), so a cycle hidden behind a lazy import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dasd_megatron", "sglang_rollout", "recipes", "tools", "bench")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def find_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def _owner(name: str, modules) -> str | None:
    """The module that defines `name` (a module, or an attribute of one): the longest known prefix."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _from_base(module: str, path: Path, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]):
    """(edges, private): edges[m] = the package modules m imports; private = [(importer, module, name)] for every
    underscore name imported from another module of the packages."""
    edges: dict[str, set[str]] = {}
    private: list[tuple[str, str, str]] = []
    for mod, path in modules.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _owner(alias.name, modules)
                    if target:
                        out.add(target)
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(mod, path, node)
                if not base or _owner(base, modules) is None:
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:  # a submodule
                        out.add(full)
                        continue
                    owner = _owner(base, modules)
                    out.add(owner)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and owner != mod:
                        private.append((mod, owner, alias.name))
        out.discard(mod)
        edges[mod] = out
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in edges:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


@pytest.fixture(scope="module")
def graph():
    modules = find_modules(REPO)
    assert "dasd_megatron.train.loop" in modules and "sglang_rollout.rollout_client" in modules
    return import_graph(modules)


def test_no_import_cycles(graph):
    edges, _ = graph
    found = cycles(edges)
    assert not found, "import cycles (break each with a leaf module both sides import):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_no_private_name_imported_across_modules(graph):
    _, private = graph
    assert not private, ("underscore names imported from another module (make them public in a module both "
                         "sides may import):\n" + "\n".join(f"{m} imports {o}.{n}" for m, o, n in private))


def test_the_checker_sees_cycles_and_private_imports(tmp_path):
    """The two checks above are only as good as the graph: a lazy (function-level) cycle, a relative import and a
    private name are all seen."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("from pkg.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..a import _helper\n    return _helper\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    edges, private = import_graph(find_modules(tmp_path, ("pkg",)))
    assert edges["pkg.a"] == {"pkg.sub.b"} and edges["pkg.sub.b"] == {"pkg.a"} and edges["pkg.c"] == {"pkg.a"}
    assert edges["pkg.sub"] == {"pkg.sub.b"}
    assert cycles(edges) == [["pkg.a", "pkg.sub.b"]]
    assert private == [("pkg.sub.b", "pkg.a", "_helper")]

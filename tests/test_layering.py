"""Imports point one way: lower layers never import higher ones, and no package imports
itself in a circle (function-level imports included in both)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lmstack"
LAYERS = {
    "config": 0, "errors": 0, "files": 0, "assets": 0, "tokenizer": 0, "model": 0,
    "data": 1, "peft": 1, "quant": 1,
    "train": 2, "eval": 2, "infer": 2,
    "serve": 3, "rag": 3, "guard": 3, "monitor": 3,
    "cli": 4, "__main__": 4,
}


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "lmstack":
        return None
    if len(parts) == 1:
        return 0  # the package root only carries __version__ and a lazy LLM export
    return LAYERS.get(parts[1])


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_every_package_folder_has_a_layer():
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders <= set(LAYERS), f"folders without a layer: {folders - set(LAYERS)}"


def test_imports_point_down():
    violations, checked = [], 0
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts)
        if mod == "lmstack.__init__":
            continue
        here = _layer_of(mod.replace(".__init__", ""))
        assert here is not None, f"{mod} has no layer"
        for line, target in _imports(ast.parse(path.read_text())):
            there = _layer_of(target)
            checked += 1
            if there is not None and there > here:
                violations.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert checked > 20
    assert not violations, "upward imports:\n" + "\n".join(violations)


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    return ".".join(rel.parts).replace(".__init__", "")


def _import_graph(pkg: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports (``from a import b`` counts ``a.b``
    when ``a.b`` is a module, else ``a``). The package root's lazy exports are left out."""
    files = {_module_name(p, pkg): p for p in pkg.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        if mod == pkg.name:
            continue
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            for t in targets:
                while t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod and t != pkg.name:
                    edges.add(t)
        graph[mod] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _import_graph(PKG)
    assert sum(len(e) for e in graph.values()) > 50
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("late", [False, True])
def test_a_planted_cycle_is_found(tmp_path, late):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from pkg.sub.b import f\n")
    body = "def g():\n    from pkg.sub import a\n" if late else "import pkg.sub.a\n"
    (pkg / "sub" / "b.py").write_text(body)
    (pkg / "sub" / "c.py").write_text("from pkg.sub import a\n")  # points in, not a cycle
    assert _cycles(_import_graph(pkg)) == [["pkg.sub.a", "pkg.sub.b"]]

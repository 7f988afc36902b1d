"""Imports point one way: lower layers never import higher ones (function-level imports included)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lmstack"
LAYERS = {
    "config": 0, "errors": 0, "assets": 0, "tokenizer": 0, "model": 0,
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

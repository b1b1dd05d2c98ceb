"""The package's imports flow one way: read statically (ast), every import, lazy ones inside functions and
those under TYPE_CHECKING included, must go to a module of the same or a lower layer below, and no set of
modules may import each other in a circle. A new module must be given a layer here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "specforge"

# Lowest first. A module belongs to the layer that names it, else to the one that names a package above it.
LAYERS = [
    ("base", ["specforge", "specforge.log", "specforge.config", "specforge.graphs", "specforge.files"]),
    ("kernels", ["specforge.kernels"]),
    ("building blocks", ["specforge.layers"]),
    ("data", ["specforge.data"]),
    ("target", ["specforge.targets", "specforge.static_target", "specforge.generate", "specforge.parallel.mesh",
                "specforge.parallel.tensor_parallel", "specforge.parallel.data", "specforge.parallel.draft",
                "specforge.model_shapes"]),
    ("draft", ["specforge.eagle3.grad_sums", "specforge.eagle3.draft", "specforge.eagle3.ttt"]),
    ("checkpoint", ["specforge.eagle3.layouts", "specforge.eagle3.checkpoint", "specforge.parallel.checkpoint"]),
    ("commands", ["specforge.synthesize", "specforge.prepare", "specforge.dump", "specforge.eagle3.train"]),
    ("decoder", ["specforge.eagle3.decoder", "specforge.eagle3.acceptance", "specforge.bench"]),
    ("cli", ["specforge.cli", "specforge.__main__"]),
]


def modules(root: Path, package: str = "specforge") -> dict[str, Path]:
    found = {}
    for f in sorted(root.rglob("*.py")):
        parts = [package, *f.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = f
    return found


def imports(mods: dict[str, Path], package: str = "specforge") -> dict[str, set[str]]:
    """module -> the package's modules it imports (a name imported from a package counts as the submodule
    when there is one, else the package)."""
    edges = {}
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name and t.split(".")[0] == package:
                    found.add(t)
        edges[name] = found
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Sets of modules that import each other, directly or through others (strongly connected components of
    more than one module, or a module importing itself)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer_of(name: str, layers=LAYERS) -> int:
    for match in (lambda e: name == e, lambda e: e != "specforge" and name.startswith(e + ".")):
        for i, (_, entries) in enumerate(layers):
            if any(match(e) for e in entries):
                return i
    raise AssertionError(f"{name} has no layer in tests/test_imports.py LAYERS: give it one")


def upward(edges: dict[str, set[str]], layers=LAYERS) -> list[str]:
    return [f"{a} ({layers[layer_of(a, layers)][0]}) imports {b} ({layers[layer_of(b, layers)][0]})"
            for a in sorted(edges) for b in sorted(edges[a]) if layer_of(b, layers) > layer_of(a, layers)]


def test_no_import_circles():
    assert circles(imports(modules(PACKAGE))) == []


def test_imports_go_down_the_layers():
    """Kernels import nothing of the model, the data or the commands; data nothing of the targets; and so on."""
    assert upward(imports(modules(PACKAGE))) == []


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The two checks above on a planted package: a lazy circle between two commands, and a kernel that
    imports the draft under TYPE_CHECKING only."""
    root = tmp_path / "specforge"
    for sub in ("", "kernels", "eagle3"):
        (root / sub).mkdir(exist_ok=True)
        (root / sub / "__init__.py").write_text("")
    (root / "dump.py").write_text("def f():\n    from .eagle3.train import g\n")
    (root / "eagle3" / "train.py").write_text("def g():\n    from ..dump import f\n")
    (root / "eagle3" / "draft.py").write_text("from ..kernels import loss\n")
    (root / "kernels" / "loss.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..eagle3.draft import Draft\n")
    edges = imports(modules(root))
    assert circles(edges) == [["specforge.dump", "specforge.eagle3.train"],
                              ["specforge.eagle3.draft", "specforge.kernels.loss"]]
    assert upward(edges) == ["specforge.kernels.loss (kernels) imports specforge.eagle3.draft (draft)"]

"""Imports between hf_compress modules flow one way: no cycle, counting imports inside functions too.

The graph is read from the source (ast), so a lazy import inside a function counts like a top-level one: a cycle
hidden in a function body is still two modules that cannot be understood apart. The one allowed pattern is a
registry loading its plugins (`ALLOWED`): the registry module imports each plugin module by name, and each plugin
imports the registry to register itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = Path(REPO) / "hf_compress"

#: (registry, plugin package prefix): the registry may import its plugins, which import it back
ALLOWED = {
    ("hf_compress.methods", "hf_compress.methods."),
    ("hf_compress.kv.registry", "hf_compress.kv."),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the hf_compress modules it imports (anywhere in its body), by their module names."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            for target in targets:
                while target and target not in files:  # hf_compress.kernels.cpu.x -> hf_compress.kernels.cpu
                    target = target.rpartition(".")[0]
                if target.startswith("hf_compress") and target != module:
                    graph[module].add(target)
    return graph


def _allowed(a: str, b: str) -> bool:
    return any((a == reg and b.startswith(pre)) or (b == reg and a.startswith(pre)) for reg, pre in ALLOWED)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), after dropping allowed edges and the
    edges from a package's __init__ to its own submodules (re-exports)."""
    edges = {m: {t for t in ts if not _allowed(m, t) and not t.startswith(m + ".")} for m, ts in graph.items()}
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "hf_compress.config" in graph["hf_compress.compressor"]
    assert all(m.startswith("hf_compress") for ts in graph.values() for m in ts)


def test_only_package_inits_import_the_package_root():
    """``from . import X`` out of ``hf_compress/__init__`` from a module below it hides a cycle (the root imports
    every module to re-export it): modules import what they need from the module that defines it."""
    graph = import_graph()
    offenders = sorted(m for m, ts in graph.items() if "hf_compress" in ts and m != "hf_compress")
    assert not offenders, f"these modules import from the package root hf_compress: {offenders}"


def test_no_import_cycles_between_hf_compress_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (function-level imports count): " + "; ".join(" <-> ".join(c) for c in found)

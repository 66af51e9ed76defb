"""The package's layers (README, "Architecture"): imports point one way, no cycles, no private names across
subpackages, and only the native package touches pointers. Parsed with ``ast`` from the source, so imports inside
functions and ``if TYPE_CHECKING`` blocks count too."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import cellvae

SRC = Path(cellvae.__file__).resolve().parent
# cli -> jobs -> models -> {analysis, metrics, train} -> vae -> native; a layer imports only layers below it.
RANK = {"cli": 7, "jobs": 6, "models": 5, "analysis": 4, "metrics": 4, "train": 3, "plot": 3, "vae": 2, "native": 1}
BASE = {"data", "errors", "settings", "_version"}  # every layer may use these
TOP = {"__init__", "_aliases"}  # the package's front door imports anything


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, str]]:
    """(imported module, imported name) pairs of a cellvae module, relative imports resolved."""
    f, is_pkg = MODULES[name]
    out = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cellvae":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, "") if sub in MODULES else (target, a.name))
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.split(".")[0] == "cellvae"]
    return out


def _part(module: str) -> str:
    """The layer a module belongs to: its subpackage, or its own name at the top level."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    unknown = sorted({_part(m) for m in MODULES} - set(RANK) - BASE - TOP)
    assert not unknown, f"place these in RANK or BASE (and in the README's architecture section): {unknown}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name):
    src = _part(name)
    if src in TOP:
        return
    bad = []
    for target, _ in _imports(name):
        dst = _part(target)
        if dst == src or dst in BASE:
            continue
        if src in BASE:  # the base imports only the base
            bad.append(target)
        elif dst in TOP or RANK.get(dst, 99) >= RANK[src]:
            bad.append(target)
    assert not bad, f"{name} ({src}) imports upward or sideways: {bad}"


def test_no_private_names_across_subpackages():
    bad = []
    for name in MODULES:
        for target, imported in _imports(name):
            if imported.startswith("_") and not imported.startswith("__") and _part(target) != _part(name):
                bad.append(f"{name} <- {target}.{imported}")
    assert not bad, bad


def test_no_import_cycles():
    edges = {m: {t for t, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package __init__ re-exporting its children is not a cycle of the design
    edges = {m: {t for t in ts if not MODULES[t][1]} for m, ts in edges.items() if not MODULES[m][1]}
    seen, stack, on, cycles = {}, [], set(), []

    def visit(v, path):
        seen[v] = True
        on.add(v)
        for w in edges.get(v, ()):
            if w in on:
                cycles.append(path[path.index(w):] + [w])
            elif w not in seen:
                visit(w, path + [w])
        on.discard(v)

    for m in edges:
        if m not in seen:
            visit(m, [m])
    assert not cycles, cycles[:3]


def test_only_native_ops_touch_the_library():
    """Calls into the kernels (``lib.cv_*``, ``library()``) and raw data pointers (``.data_ptr()``) live in
    cellvae.native.ops, the checked boundary, and nowhere else."""
    bad = []
    for name, (f, _) in MODULES.items():
        if _part(name) == "native":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and (node.attr.startswith("cv_") or node.attr == "data_ptr"):
                bad.append(f"{name}: .{node.attr}")
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "library":
                bad.append(f"{name}: library()")
    assert not bad, bad


@pytest.mark.parametrize("old, new", sorted(importlib.import_module("cellvae._aliases").MOVED.items()))
def test_old_module_paths_still_import(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)

"""The import graph of refsd and refsd_validate: no cycles, no upward imports.

Every ``import`` and ``from ... import`` in the two packages is read from the
source (function-level, "lazy" imports included: they are dependencies all the
same) and mapped to the module it names. The layers, lowest first:

====  ======================================================================
0     foundations: numerics, kernels, trace, safe_io, limits, blas, image, data, console
1     where ops run: context, monitor
2     ops
3     models, schedulers, schedulers_config
4     weights, pipeline, names, tiny, catalogue, testing, fp16fix
5     export, golden
6     the validator (refsd_validate), below its command line
7     entry points: the command lines (refsd.cli, refsd_validate.cli), the demo,
      ``__main__``
====  ======================================================================

A module may import its own layer or any below it, never above; no module
imports an entry point; a private name (``_x``) is imported only within its
own package.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"refsd": ROOT / "refsd", "refsd_validate": ROOT / "validate"}

LAYERS = [
    ("refsd", "refsd.numerics", "refsd.kernels", "refsd.trace", "refsd.safe_io", "refsd.limits", "refsd.blas",
     "refsd.image", "refsd.data", "refsd.console"),
    ("refsd.context", "refsd.monitor"),
    ("refsd.ops",),
    ("refsd.models", "refsd.schedulers", "refsd.schedulers_config"),
    ("refsd.weights", "refsd.pipeline", "refsd.names", "refsd.tiny", "refsd.catalogue", "refsd.testing",
     "refsd.fp16fix"),
    ("refsd.export", "refsd.golden"),
    ("refsd_validate",),
    ("refsd.cli", "refsd_validate.cli", "refsd.demo", "refsd.__main__", "refsd_validate.__main__"),
]
ENTRY_POINTS = set(LAYERS[-1])


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = [pkg, *f.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


MODULES = modules()


def layer(module: str) -> int:
    """The layer of the longest prefix that names one (a package names its submodules)."""
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    assert best is not None, f"{module}: in no layer (add it to LAYERS)"
    return best[0]


def imports() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> the modules it imports; and (importer, module, private name) for every ``_name`` imported."""
    edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for mod, f in MODULES.items():
        is_pkg = f.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                targets = [(base, a.name) for a in node.names]
            else:
                continue
            for base, name in targets:
                if base.split(".")[0] not in PACKAGES:
                    continue
                full = f"{base}.{name}" if name else base
                target = full if full in MODULES else base
                while target not in MODULES:  # "import refsd.ops.conv" names refsd.ops.conv; else its package
                    target = target.rsplit(".", 1)[0]
                if target != mod:
                    edges[mod].add(target)
                for part in (full.split(".")[1:] if name is None or full in MODULES else [*base.split(".")[1:], name]):
                    if part.startswith("_") and not part.startswith("__"):
                        private.append((mod, full, part))
    return edges, private


EDGES, PRIVATE = imports()


def _package(module: str) -> str:
    return module if (MODULES[module].name == "__init__.py") else module.rsplit(".", 1)[0]


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_no_import_cycles():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in EDGES.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_upward_imports():
    upward = [(m, t) for m, ts in EDGES.items() for t in ts if layer(t) > layer(m)]
    assert not upward, "imports of a higher layer: " + ", ".join(f"{m} -> {t}" for m, t in sorted(upward))


def test_no_module_imports_an_entry_point():
    # ``python -m`` runs a package's command line, and ``refsd demo`` runs the demo: nothing else may.
    allowed = {("refsd.__main__", "refsd.cli"), ("refsd_validate.__main__", "refsd_validate.cli"),
               ("refsd.cli", "refsd.demo")}
    bad = [(m, t) for m, ts in EDGES.items() for t in ts if t in ENTRY_POINTS and (m, t) not in allowed]
    assert not bad, "imports of a command line or the demo: " + ", ".join(f"{m} -> {t}" for m, t in sorted(bad))


def test_private_names_stay_in_their_package():
    bad = []
    for importer, full, part in PRIVATE:
        owner = full.split("." + part, 1)[0]  # the package or module the private name belongs to
        owner_pkg = owner if owner in MODULES and MODULES[owner].name == "__init__.py" else owner.rsplit(".", 1)[0]
        if not (_package(importer) == owner_pkg or _package(importer).startswith(owner_pkg + ".")):
            bad.append(f"{importer} imports {full}")
    assert not bad, "private names used outside their package: " + ", ".join(sorted(bad))


def test_the_checks_can_fail(monkeypatch):
    """The checks above are not vacuous: a planted cycle and an upward import are found."""
    monkeypatch.setitem(EDGES, "refsd.numerics", EDGES.get("refsd.numerics", set()) | {"refsd.monitor"})
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="higher layer"):
        test_no_upward_imports()

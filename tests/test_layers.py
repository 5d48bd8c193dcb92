"""The package's layers keep their shape (specs/overview.md, "Layout").

* ``onionp2p/proto/`` is pure: it imports nothing from outside ``proto`` but the typed
  errors, never asyncio, socket, ssl, selectors or threading, and never reads the clock
  (the time is passed in);
* lower layers do not import higher ones (``net`` knows no relay or client; the relay
  knows no client, directory, control port or tools; only composition roots —
  ``cli``, ``testnet``, ``client/node.py`` — join everything);
* there are no import cycles between modules, and no module is named like a module of
  the standard library.

Imports under ``if TYPE_CHECKING:`` are for type checkers only and are not counted.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onionp2p"

#: stdlib modules a pure layer must not import (I/O, tasks, threads)
IMPURE = {"asyncio", "socket", "ssl", "selectors", "threading", "subprocess", "multiprocessing"}
#: calls that read the clock
CLOCK = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter"), ("time", "time_ns"),
         ("time", "monotonic_ns"), ("datetime", "now"), ("datetime", "utcnow"), ("date", "today"),
         ("time", "localtime"), ("time", "gmtime"), ("time", "ctime"), ("time", "asctime")}

#: what each layer may import from the package (besides itself); None: anything
ALLOWED: dict[str, set[str] | None] = {
    "proto": {"errors"},
    "net": {"proto", "errors", "log", "listeners", "defaults"},
    "relay": {"net", "proto", "errors", "log", "listeners", "config", "defaults", "bootstrap", "keyfiles"},
    "client": {"net", "proto", "errors", "log", "listeners", "config", "defaults", "bootstrap", "keyfiles"},
    "dir": {"client", "net", "proto", "errors", "log", "listeners", "config", "defaults", "__version__",
            "bootstrap"},
    "control": {"client", "dir", "net", "proto", "errors", "log", "listeners", "config", "defaults", "__version__",
                "bootstrap"},
    "ops": {"proto", "errors", "log", "listeners", "__version__"},
    "config": {"proto", "errors", "defaults"},
    "defaults": set(),
    "errors": set(),
    "keyfiles": {"errors"},
    "log": {"errors"},
    "listeners": {"log"},
    "bootstrap": {"log", "listeners"},
}
#: modules that compose the layers (they may import any of them)
ROOTS = {"onionp2p.cli", "onionp2p.testnet", "onionp2p.__main__", "onionp2p.client.node"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(("onionp2p", *rel.parts)).removesuffix(".__init__")
        out[name] = path
    return out


def runtime_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) for each import not under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(x) for stmt in node.body for x in ast.walk(stmt))
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.append(("." * node.level + (node.module or ""), [a.name for a in node.names], node.lineno))
    return out


def layer_of(name: str) -> str:
    """``onionp2p.proto.cells`` -> ``proto``; ``onionp2p`` (the package's __init__) -> ``__init__``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = modules()


def package_targets(module: str, names: list[str]) -> list[str]:
    """The package modules an import statement reaches."""
    if module == "onionp2p":
        return [f"onionp2p.{n}" for n in names]  # a module, or a name of the package (__version__)
    if not module.startswith("onionp2p."):
        return []
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs or [module]


@pytest.mark.parametrize("name", [n for n in MODULES if layer_of(n) == "proto"])
def test_proto_is_pure(name):
    path = MODULES[name]
    for module, names, line in runtime_imports(path):
        assert not module.startswith("."), f"{name}:{line}: relative import"
        top = module.split(".")[0]
        assert top not in IMPURE, f"{name}:{line}: imports {module} (the pure core must not do I/O)"
        for target in package_targets(module, names):
            assert layer_of(target) in ("proto", "errors"), f"{name}:{line}: imports {target}"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
            call = (owner_name, node.func.attr)
            reads_clock = call in CLOCK and not (call[1] in ("localtime", "gmtime", "ctime", "asctime")
                                                  and node.args)
            assert not reads_clock, f"{name}:{node.lineno}: reads the clock ({'.'.join(call)}); take `now`"


@pytest.mark.parametrize("name", [n for n in MODULES if n not in ROOTS])
def test_layers_only_import_what_is_below_them(name):
    layer = layer_of(name)
    allowed = ALLOWED.get(layer)
    assert allowed is not None or layer in ("cli", "testnet", "__main__", "__init__"), f"unknown layer {layer}"
    for module, names, line in runtime_imports(MODULES[name]):
        assert not module.startswith("."), f"{name}:{line}: relative import (use onionp2p.<layer>...)"
        for target in package_targets(module, names):
            other = layer_of(target)
            if other == layer or allowed is None:
                continue
            assert other in allowed, f"{name}:{line}: the {layer} layer imports {target} ({other})"
            assert target not in ROOTS, f"{name}:{line}: imports the composition root {target}"


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for module, names, _line in runtime_imports(path):
            deps.update(t for t in package_targets(module, names) if t in MODULES and t != name)
        graph[name] = deps
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_shadows_the_standard_library():
    clashes = [name for name in MODULES if name.rsplit(".", 1)[-1] in sys.stdlib_module_names]
    assert not clashes, clashes


def test_the_checks_see_what_they_should(tmp_path):
    """The scanner itself: an impure import, a clock read and a relative import are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom . import x\nimport time\nt = time.monotonic()\n"
                   "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import socket\n")
    found = runtime_imports(bad)
    assert [m for m, _n, _l in found] == ["asyncio", ".", "time", "typing"]
    calls = [n for n in ast.walk(ast.parse(bad.read_text())) if isinstance(n, ast.Call)]
    assert calls and (calls[0].func.value.id, calls[0].func.attr) in CLOCK

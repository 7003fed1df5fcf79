"""The package layout's rules, checked on the source tree (no imports run)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "ctlive"


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py") if "scripts" not in p.parts}


def imports(mod: str) -> set[str]:
    """ctlive modules that ``mod`` imports, by its import statements."""
    path = MODULES[mod]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from ctlive.x import y": y may be a module of the package x
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in MODULES and n != "ctlive"}
    return out


def closure(mod: str) -> set[str]:
    seen, todo = set(), [mod]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(imports(m))
    return seen


def test_no_module_longer_than_500_lines() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_few_modules_at_the_top_level() -> None:
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 6, top


@pytest.mark.parametrize("receiver_side", ["ctlive.migration.destination",
                                           "ctlive.transport.server", "ctlive.cli.serve"])
def test_the_receiver_never_imports_the_source_side(receiver_side: str) -> None:
    source_side = {"ctlive.migration.source", "ctlive.migration.iteration",
                   "ctlive.transport.client"}
    assert closure(receiver_side) & source_side == set()


def test_the_protocol_layer_does_no_io() -> None:
    """ctlive.protocol imports nothing above it, and no I/O library."""
    for mod in (m for m in MODULES if m.startswith("ctlive.protocol")):
        assert all(m.startswith(("ctlive.protocol", "ctlive.errors", "ctlive.identity"))
                   for m in imports(mod)), mod
        tree = ast.parse(MODULES[mod].read_text())
        used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
        used |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
        assert not used & {"anyio", "trio", "asyncio", "socket", "subprocess"}, mod


def test_importing_the_receiver_loads_nothing_of_the_source() -> None:
    """At run time too: ``ctlive``'s top-level names load lazily."""
    import subprocess
    import sys

    code = ("import sys, ctlive.migration.destination, ctlive.transport.server; "
            "print(sorted(m for m in sys.modules if m in {'ctlive.migration.source', "
            "'ctlive.migration.iteration', 'ctlive.transport.client'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    code = "import ctlive; print(ctlive.migrate.__module__, ctlive.serve.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["ctlive.migration.source", "ctlive.migration.destination"]

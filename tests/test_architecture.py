"""Import-graph rules of the package.

``galpipe.testing`` holds test doubles (the stand-in SkyServer); production
modules never import it.  The only exception is the ``galpipe fake-skyserver``
command, which imports it lazily, inside the command's function.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "galpipe"
TESTING = "galpipe.testing"
#: module -> functions allowed to import galpipe.testing (lazily, when they run)
LAZY_IMPORT_ALLOWED: dict[str, set[str]] = {"galpipe.cli": {"cmd_fake_skyserver"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def production_modules() -> list[str]:
    """Every module of the galpipe package except the test doubles (and a ``__main__``)."""
    names = {_module_name(p) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    return sorted(n for n in names
                  if not (n == TESTING or n.startswith(TESTING + ".")) and not n.endswith("__main__"))


def _imports_of_testing(tree: ast.AST) -> list[tuple[int, str | None]]:
    """``(line, enclosing function or None)`` of every import of galpipe.testing in ``tree``."""
    found: list[tuple[int, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            if any(n == TESTING or n.startswith(TESTING + ".") for n in names):
                found.append((child.lineno, func))
            visit(child, func)

    visit(tree, None)
    return found


def test_production_modules_are_found() -> None:
    mods = production_modules()
    for expected in ("galpipe.cli", "galpipe.config", "galpipe.stages", "galpipe.sources", "galpipe.nn"):
        assert expected in mods
    assert not any(m.startswith(TESTING) for m in mods)


def test_no_production_module_imports_the_test_doubles() -> None:
    """Static check, lazy imports included: only the allowed functions may import galpipe.testing."""
    bad = []
    production = set(production_modules())
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name not in production:
            continue
        for line, func in _imports_of_testing(ast.parse(path.read_text(encoding="utf-8"))):
            if func not in LAZY_IMPORT_ALLOWED.get(name, set()):
                bad.append(f"{path.relative_to(REPO)}:{line} ({'in ' + func if func else 'module level'})")
    assert not bad, f"production code imports {TESTING}: {bad}"


_PROBE = """
import importlib, json, sys
out = {}
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
    if name == "galpipe.cli":
        sys.modules[name].build_parser()  # building every subcommand must not import it either
    out[name] = sorted(m for m in sys.modules if m == "galpipe.testing" or m.startswith("galpipe.testing."))
print(json.dumps(out))
"""


def test_importing_production_modules_does_not_load_the_test_doubles() -> None:
    """Each production module, imported in a fresh interpreter, leaves galpipe.testing unloaded.

    One interpreter imports them one after the other (one each would take about a
    second per module) and records ``sys.modules`` after each import: the first
    module whose import loads galpipe.testing is named.
    """
    mods = production_modules()
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(mods)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, f"importing the production modules failed:\n{res.stderr[-4000:]}"
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert list(loaded) == mods
    culprits = {m: t for m, t in loaded.items() if t}
    assert not culprits, f"importing these production modules loads the test doubles: {culprits}"


@pytest.mark.parametrize("argv", [["galpipe", "fake-skyserver", "--help"],
                                  ["-m", "galpipe.testing.fakeserver", "--help"]], ids=["cli", "module"])
def test_fake_skyserver_entry_points(argv: list[str]) -> None:
    cmd = ([sys.executable, "-c", "import sys; from galpipe.cli import main; sys.exit(main(sys.argv[1:]))",
            *argv[1:]] if argv[0] == "galpipe" else [sys.executable, *argv])
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--fault-rate" in res.stdout

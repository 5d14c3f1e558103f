"""Who may import whom: the benchmarks run without the tests, the product without either, and the wheel ships the
product only. Read from the source (every import statement, in functions too, and the Python scripts that benches
hand to subprocesses as strings), not from what happens to be imported at run time."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("agent", "drivers", "model", "sync", "central", "web")
# package -> the top-level packages it must never import
NEVER = {
    "bench": {"tests"},
    "testkit": {"tests", "bench"},
    **{package: {"tests", "testkit", "bench"} for package in PRODUCT},
}
SCRIPT_IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.MULTILINE)


def imported(tree: ast.AST) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import, and of the imports in string constants that read as
    Python scripts (a subprocess's `-c` source)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name.split(".")[0]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" in node.value:
            found |= {(node.lineno, name) for name in SCRIPT_IMPORT.findall(node.value)}
    return found


def violations(package: str, forbidden: set[str]) -> list[str]:
    sources = sorted((ROOT / package).rglob("*.py"))
    assert sources, f"no Python files under {package}/"
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for path in sources
            for line, name in sorted(imported(ast.parse(path.read_text(), str(path))))
            if name in forbidden]


@pytest.mark.parametrize("package", sorted(NEVER))
def test_a_package_never_imports_what_it_must_run_without(package):
    assert violations(package, NEVER[package]) == []


def private_uses(tree: ast.AST) -> set[tuple[int, str]]:
    """(line, name) of every private name imported from the product, and of every `x._name` whose x is not the
    object's own self or cls."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in PRODUCT:
            found |= {(node.lineno, alias.name) for alias in node.names if alias.name.startswith("_")}
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.add((node.lineno, node.attr))
    return found


def test_the_benchmarks_use_only_public_apis():
    found = [f"{path.relative_to(ROOT)}:{line} uses {name}"
             for path in sorted((ROOT / "bench").rglob("*.py"))
             for line, name in sorted(private_uses(ast.parse(path.read_text(), str(path))))]
    assert found == []


def test_the_scan_sees_imports_in_functions_and_in_subprocess_scripts():
    tree = ast.parse('def f():\n    from tests.central import batches\nSCRIPT = """\nimport sys\nfrom testkit import net\n"""\n')
    assert {name for _, name in imported(tree)} == {"tests", "sys", "testkit"}
    tree = ast.parse("from agent.store import _INSERT, Store\nfrom json import _private\ndriver._loop.stop()\n"
                     "self._own = cls._too = object.__dict__\n")
    assert private_uses(tree) == {(1, "_INSERT"), (3, "_loop")}


def test_the_wheel_ships_the_product_only():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = {name.split(".")[0] for name in find_packages(str(ROOT), include=include)}
    assert shipped == set(PRODUCT)

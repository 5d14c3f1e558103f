"""Who may import whom: the benchmarks run without the tests, the product without either, and the wheel ships the
product only. Read from the source (every import statement, in functions too, and the Python scripts that benches
hand to subprocesses as strings), not from what happens to be imported at run time."""

from __future__ import annotations

import ast
import re
import tomllib
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("agent", "drivers", "model", "sync", "central", "web")
# the product's layers: the agent wires the parts together, central runs without the agent, web serves both
LAYERS = {"drivers": {"agent"}, "model": {"agent"}, "sync": {"agent"}, "central": {"agent", "drivers"},
          "web": {"agent", "central"}}
# package -> the top-level packages it must never import
NEVER = {
    "bench": {"tests"},
    "testkit": {"tests", "bench"},
    **{package: {"tests", "testkit", "bench"} | LAYERS.get(package, set()) for package in PRODUCT},
}
MAX_LINES = 600  # per module of the product's runtime packages (STYLE: short modules, one concern each)
SHORT = ("agent", "drivers", "central")
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


@pytest.mark.parametrize("package", SHORT)
def test_no_module_is_longer_than_the_limit(package):
    lengths = {path: len(path.read_text().splitlines()) for path in sorted((ROOT / package).rglob("*.py"))}
    assert [f"{path.relative_to(ROOT)}: {lines} lines" for path, lines in lengths.items() if lines > MAX_LINES] == []


def product_modules() -> dict[str, Path]:
    """module name -> file, of every module of the product (packages' __init__ files excepted)."""
    return {".".join(path.relative_to(ROOT).with_suffix("").parts): path
            for package in PRODUCT for path in (ROOT / package).rglob("*.py") if path.name != "__init__.py"}


def module_imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The product's modules a module imports anywhere (in functions and under TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found & modules


def test_no_import_cycle_between_the_products_modules():
    modules = product_modules()
    graph = {name: module_imports(ast.parse(path.read_text(), str(path)), set(modules)) - {name}
             for name, path in modules.items()}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


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
    tree = ast.parse("if TYPE_CHECKING:\n    from agent.service import Agent\ndef f():\n    from agent import store\n")
    assert module_imports(tree, {"agent.service", "agent.store", "agent.status"}) == {"agent.service", "agent.store"}


def test_the_wheel_ships_the_product_only():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = {name.split(".")[0] for name in find_packages(str(ROOT), include=include)}
    assert shipped == set(PRODUCT)

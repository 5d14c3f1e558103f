"""The README documents what exists: every command in its table runs, and every command has a row."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import parser

README = Path(__file__).resolve().parent.parent / "README.md"


def documented_commands() -> list[tuple[str, ...]]:
    rows = re.findall(r"^\| `pdm-edge ([a-z -]+?)(?: \[| [A-Z-]|`)", README.read_text(), flags=re.MULTILINE)
    return [tuple(row.split()) for row in rows]


def cli_commands() -> set[tuple[str, ...]]:
    commands = set()

    def walk(p, prefix):
        subparsers = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subparsers:
            commands.add(prefix)
        for action in subparsers:
            for name, sub in action.choices.items():
                walk(sub, (*prefix, name))

    walk(parser(), ())
    return commands


def test_the_readme_lists_commands():
    assert len(documented_commands()) >= 7


@pytest.mark.parametrize("command", documented_commands(), ids=" ".join)
def test_every_documented_command_exists(command):
    assert command in cli_commands()


def test_every_command_is_documented():
    assert cli_commands() == set(documented_commands())


def test_the_readme_says_where_the_data_set_comes_from_and_how_to_check_it():
    from model import data

    text = " ".join(README.read_text().split())
    for fact in (data.NAME, "UCI Machine Learning Repository", data.FILE_NAME, data.LICENSE, data.SHA256,
                 data.DATA_ENV):
        assert fact in text, fact


def test_a_missing_data_set_is_explained_where_the_tests_skip():
    from model import data

    env = {k: v for k, v in os.environ.items() if k != "CI"} | {data.DATA_ENV: "/nonexistent/ai4i2020.csv"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/model/test_training.py::test_the_shipped_model_meets_its_acceptance_figures",
                          "tests/model/test_training.py::test_the_shipped_figures_are_recomputed_from_the_onnx_file"],
                         cwd=README.parent, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert "1 passed, 1 skipped" in run.stdout, run.stdout
    said = " ".join(run.stdout.split())
    for fact in (data.NAME, "UCI Machine Learning Repository", data.FILE_NAME, data.SHA256, data.DATA_ENV):
        assert fact in said, fact


ROOT = README.parent
DEPLOYMENT = ROOT / "DEPLOYMENT.md"


def project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_every_version_deployment_names_is_the_project_version():
    named = re.findall(r"pdm_edge-(\d[^-]*)-py3|pdm-(?:edge|central):(\d[\w.]*)", DEPLOYMENT.read_text())
    versions = {wheel or image for wheel, image in named}
    assert versions == {project_version()}


def test_deployment_says_how_to_build_the_wheel_it_installs():
    text = DEPLOYMENT.read_text()
    assert "pip wheel --no-deps --wheel-dir dist ." in text
    assert f"dist/pdm_edge-{project_version()}-py3-none-any.whl" in text


def test_every_rejection_reason_is_in_the_readme_table():
    from model.validate import Reason

    table = set(re.findall(r"^\| `([a-z_]+)` \|", README.read_text(), flags=re.MULTILINE))
    assert {reason.value for reason in Reason} <= table


def test_the_readme_states_the_machine_id_rule_the_code_applies():
    from drivers.base import MachineId
    from drivers.mqtt import _MACHINE_ID

    pattern = MachineId.__metadata__[0].pattern  # type: ignore[attr-defined]  # Annotated[str, ...]
    assert pattern == f"^{_MACHINE_ID.pattern}$"
    assert f"`{_MACHINE_ID.pattern}`" in README.read_text()


def test_the_example_describes_the_quarantine_not_the_dead_letters():
    [line] = [line for line in (ROOT / "examples/agent.toml").read_text().splitlines()
              if line.startswith("quarantine_max_rows")]
    assert "rejected readings" in line and "central rejected" not in line


@pytest.mark.parametrize("doc", ["README.md", "DEPLOYMENT.md"])
def test_mosquitto_advice_covers_bursts_and_names_the_setting(doc):
    text = " ".join((ROOT / doc).read_text().split())
    assert "max_queued_messages 0" in text and "burst" in text and "max_queued_bytes" in text


def documented_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for each `path.py::test_name` in `text`, and each `::test_name` after it (same file); paths
    relative to tests/ or to the checkout."""
    found, current = [], None
    for path, name in re.findall(r"`(?:tests/)?([\w/]+\.py)?::(test_\w+)", text):
        current = path or current
        if current is not None:
            found.append((current, name))
    return found


@pytest.mark.parametrize("doc", ["RELIABILITY.md", "BENCHMARKS.md", "README.md", "DEPLOYMENT.md"])
def test_every_test_a_document_names_exists(doc):
    """RELIABILITY.md's tables name the test behind each promise: a renamed test must not leave a dead name."""
    named = documented_tests((ROOT / doc).read_text(encoding="utf-8"))
    def defined(path: str, name: str) -> bool:
        file = ROOT / "tests" / path
        return file.exists() and re.search(rf"^\s*(async )?def {name}\(", file.read_text(encoding="utf-8"),
                                           re.MULTILINE) is not None

    missing = [f"{path}::{name}" for path, name in named if not defined(path, name)]
    assert not missing, missing
    if doc == "RELIABILITY.md":
        assert len(named) > 50

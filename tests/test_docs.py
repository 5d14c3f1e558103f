"""The README documents what exists: every command in its table runs, and every command has a row."""

from __future__ import annotations

import re
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

"""systemd/envfile.py reads an EnvironmentFile= as systemd does (src/basic/env-file.c), never as a shell would."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.deploy.conftest import SYSTEMD

_spec = importlib.util.spec_from_file_location("envfile", SYSTEMD / "envfile.py")
envfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(envfile)


@pytest.mark.parametrize(("text", "expected"), [
    ("A=1\n", {"A": "1"}),
    ("  A = 1  \n", {"A": "1"}),  # whitespace around the name and the value goes
    ("A=1 # not a comment\n", {"A": "1 # not a comment"}),  # `#` starts a comment at the start of a line only
    ("# A=1\n; B=2\n", {}),
    ("A=$(touch /x) ${HOME} `id`\n", {"A": "$(touch /x) ${HOME} `id`"}),  # nothing expanded, nothing run
    ('A="x \\$y \\"q\\" \\n"\n', {"A": 'x $y "q" \\n'}),  # in double quotes \ escapes only " \ ` $
    ("A='it''s' \n", {"A": "its"}),  # quoted parts join; single quotes keep everything
    ('A="two words" tail  \n', {"A": "two wordstail"}),
    ("A=con\\\ntinued\n", {"A": "continued"}),
    ("A=kept\\ \n", {"A": "kept "}),  # escaped trailing whitespace stays
    ('A="multi\nline"\n', {"A": "multi\nline"}),
    ("export A=1\n1B=2\nno assignment\nC-D=3\n", {}),  # not a valid name: ignored, as systemd does
    ("A=1\nA=2\n", {"A": "2"}),
    ("A=\n", {"A": ""}),
    ("A=last", {"A": "last"}),
    ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
])
def test_parse(text: str, expected: dict[str, str]) -> None:
    assert envfile.parse(text) == expected


def test_runs_the_command_with_the_file_over_the_inherited_environment(tmp_path) -> None:
    env_file = tmp_path / "central.env"
    env_file.write_text("PDM_A=from file\nPDM_B=$PDM_C\n")
    result = subprocess.run(
        [sys.executable, SYSTEMD / "envfile.py", env_file, "--", sys.executable, "-c",
         "import os; print(os.environ['PDM_A'], os.environ['PDM_B'], os.environ['PDM_C'], sep='|')"],
        env={"PDM_A": "inherited", "PDM_C": "kept", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        check=True, timeout=60)
    assert result.stdout == "from file|$PDM_C|kept\n"

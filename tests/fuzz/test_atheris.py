"""The coverage-guided harnesses run: a short burst of each in every test run keeps them working; the long run
(scripts/reliability.sh) gives each minutes. A harness that finds a broken promise exits non-zero."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scale import scaled

REPO = Path(__file__).resolve().parents[2]
# atheris has wheels for x86-64 Linux and CPython 3.11-3.13 only (pyproject.toml, extra dev)
pytest.importorskip("atheris", reason="atheris is not installable on this platform (see the dev extra)")


@pytest.mark.parametrize("harness", ["atheris_payloads", "atheris_registers"])
def test_the_harness_runs_clean(harness):
    runs = scaled(10_000, 1_000_000)
    done = subprocess.run([sys.executable, "-m", f"tests.fuzz.{harness}", f"-runs={runs}"], cwd=REPO,
                          capture_output=True, text=True, timeout=scaled(120, 3_600), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"Done {runs} runs", done.stderr), done.stderr[-3000:]

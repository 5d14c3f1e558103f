"""Running a coverage-guided atheris harness (tests/fuzz/atheris_*.py) from the command line:

    python -m tests.fuzz.atheris_payloads -max_total_time=600    # ten minutes; any libFuzzer option works

The growing corpus and any crashing input go to artifacts/fuzz/<name>/ (git-ignored); the committed seeds in
tests/fuzz/corpus/<name>/ are read, never written. A harness exits non-zero, with the input that broke it saved,
as soon as a promise fails or anything raises.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parents[2]


def run(name: str, test_one_input: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    corpus = REPO / "artifacts" / "fuzz" / name
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = REPO / "tests" / "fuzz" / "corpus" / name
    dictionary = seeds.with_suffix(".dict")  # tokens of the input's grammar, when the harness has one
    options = [f"-artifact_prefix={corpus}/crash-", *([f"-dict={dictionary}"] if dictionary.is_file() else [])]
    atheris.Setup([argv[0], *options, *argv[1:], str(corpus), str(seeds)], test_one_input)
    atheris.Fuzz()

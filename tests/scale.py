"""How hard the reliability tests push: a short variant in every test run, a long one on demand.

`./scripts/reliability.sh` sets PDM_RELIABILITY=long: more kills, more fuzz cases, an hour of soak, and the slow
tests (`need_slow`) the everyday suite skips. The short variant runs with the rest of the suite (`./scripts/test.sh`)
and must stay within a few minutes in all.
"""
from __future__ import annotations

import os

import pytest

LONG = os.environ.get("PDM_RELIABILITY", "short") == "long"
SLOW = LONG or os.environ.get("PDM_SLOW_TESTS") == "1"


def scaled(short: float, long: float):
    """`short` in the everyday suite, `long` under ./scripts/reliability.sh."""
    return long if LONG else short


def need_slow(what: str) -> None:
    """Skip `what`, a test of minutes, in the everyday suite (kept near 20 minutes); ./scripts/reliability.sh and
    PDM_SLOW_TESTS=1 run it."""
    if not SLOW:
        pytest.skip(f"slow ({what}): ./scripts/reliability.sh or PDM_SLOW_TESTS=1")

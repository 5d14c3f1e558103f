"""How hard the reliability tests push: a short variant in every test run, a long one on demand.

`./scripts/reliability.sh` sets PDM_RELIABILITY=long: more kills, more fuzz cases, an hour of soak. The short variant
runs with the rest of the suite (`./scripts/test.sh`) and must stay within a few minutes in all.
"""
from __future__ import annotations

import os

LONG = os.environ.get("PDM_RELIABILITY", "short") == "long"


def scaled(short: float, long: float):
    """`short` in the everyday suite, `long` under ./scripts/reliability.sh."""
    return long if LONG else short

"""What the fuzzers share: hypothesis settings scaled for the everyday suite or ./scripts/reliability.sh, and
strategies for hostile input (JSON of any shape, numbers at and beyond the edges, bad UTF-8, deep nesting)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.scale import scaled

# Parent of every fuzzer's settings: no per-example deadline (two shared cores make timings meaningless), and the
# function-scoped fixtures (a tmp folder, a database) are set up once per test on purpose, shared by its examples.
settings.register_profile(
    "pdm-fuzz", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz_settings(short: int, long: int) -> settings:
    """`short` examples in the everyday suite, `long` under PDM_RELIABILITY=long."""
    return settings(settings.get_profile("pdm-fuzz"), max_examples=scaled(short, long))


# Numbers a device, a broker or a bug can produce: NaN, ±inf, huge and tiny floats, integers beyond float64 and
# beyond int64, and the ordinary ones.
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324, -0.0, 2**63, 2**64, 10**309]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20))
json_values = st.recursive(
    scalars, lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children,
                                                                                max_size=5),
    max_leaves=20,
)


def nested(depth: int, opener: str = "[", closer: str = "]") -> bytes:
    """`depth` levels of arrays (or objects), the input that overflows a recursive parser's stack."""
    return (opener * depth + closer * depth).encode()


deep_json = st.builds(
    lambda depth, kind: nested(depth, *kind) if kind[0] == "[" else (('{"a":' * depth) + "1" + "}" * depth).encode(),
    st.integers(min_value=500, max_value=60_000), st.sampled_from([("[", "]"), ("{", "}")]),
)


def to_json(value) -> bytes:
    """Python's JSON, NaN and Infinity included (as many publishers send them); integers of any size as digits."""
    return json.dumps(value, allow_nan=True, default=str).encode()


def spoil_utf8(data: bytes, at: int, junk: bytes) -> bytes:
    """`junk` (invalid UTF-8 among others) inserted at `at`, e.g. inside a JSON string."""
    at = at % (len(data) + 1)
    return data[:at] + junk + data[at:]


bad_utf8 = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80\x80", b"\xc0\xaf"])

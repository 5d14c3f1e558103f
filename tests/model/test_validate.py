"""Validation of raw readings: one stable reason per rejection, out-of-distribution flags, never an exception."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.validate import Reason, Rejection

HEALTHY = {
    "machine_type": "M",
    "air_temperature": 300.0,
    "process_temperature": 310.0,
    "rotational_speed": 1500,
    "torque": 40.0,
    "tool_wear": 100,
}


def reading(**changes):
    r = {**HEALTHY, **changes}
    return {k: v for k, v in r.items() if v is not ...}


CASES = [
    # (reading, reason, input named, text in the message)
    ([1, 2, 3], Reason.NOT_AN_OBJECT, None, "got an array"),
    ("300.1", Reason.NOT_AN_OBJECT, None, "got a string"),
    (None, Reason.NOT_AN_OBJECT, None, "got null"),
    (reading(torque=...), Reason.MISSING_INPUT, "torque", "missing torque"),
    (reading(tool_wear=None), Reason.MISSING_INPUT, "tool_wear", "missing tool_wear"),
    (reading(machine_type=...), Reason.MISSING_INPUT, "machine_type", "missing machine_type"),
    (reading(torque="40.0"), Reason.NOT_A_NUMBER, "torque", "torque is '40.0'"),
    (reading(torque=True), Reason.NOT_A_NUMBER, "torque", "torque is true, not a number"),
    (reading(torque=[40.0]), Reason.NOT_A_NUMBER, "torque", "torque is [40.0]"),
    (reading(air_temperature=math.nan), Reason.NOT_FINITE, "air_temperature", "air_temperature is nan"),
    (reading(rotational_speed=-math.inf), Reason.NOT_FINITE, "rotational_speed", "-inf"),
    (reading(torque=-1.0), Reason.OUT_OF_RANGE, "torque", "torque = -1.0 Nm is outside the physical range 0 to 200"),
    (reading(air_temperature=20.5), Reason.OUT_OF_RANGE, "air_temperature", "air_temperature = 20.5 K"),
    (reading(tool_wear=10**400), Reason.OUT_OF_RANGE, "tool_wear", "tool_wear = 1000"),
    (reading(machine_type="X"), Reason.UNKNOWN_MACHINE_TYPE, "machine_type", "'X', not one of L, M, H"),
    (reading(machine_type=1), Reason.UNKNOWN_MACHINE_TYPE, "machine_type", "machine_type is 1"),
]


@pytest.mark.parametrize(("raw", "reason", "input_name", "text"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_each_rejection_names_its_reason_input_and_value(scorer, raw, reason, input_name, text):
    (result,) = scorer.score([raw])
    assert isinstance(result, Rejection)
    assert (result.reason, result.input) == (reason, input_name)
    assert text in result.message


def test_every_reason_code_of_the_validator_is_covered_by_the_table():
    # The others belong to the payload readers and drivers, and are tested with them.
    assert {c[1] for c in CASES} == set(Reason) - {Reason.MALFORMED, Reason.PAYLOAD_TOO_LARGE, Reason.UNKNOWN_MACHINE}


def test_one_bad_reading_does_not_spoil_its_batch(scorer):
    batch = [reading(), reading(torque="x"), reading(tool_wear=5), 7, reading(air_temperature=math.nan), reading()]
    results = scorer.score(batch)
    assert [type(r).__name__ for r in results] == ["Score", "Rejection", "Score", "Rejection", "Rejection", "Score"]
    assert results[0] == results[5]


def test_values_outside_the_training_range_are_scored_and_flagged(scorer):
    manifest = scorer.model.manifest
    hot = {i.name: i for i in manifest.inputs}["air_temperature"].training_range.max + 5
    (result,) = scorer.score([reading(air_temperature=hot, rotational_speed=3200)])
    assert not isinstance(result, Rejection)
    assert result.ood == ("air_temperature", "rotational_speed")
    (inside,) = scorer.score([reading()])
    assert inside.ood == ()


def test_numbers_of_any_real_type_are_accepted_like_floats(scorer):
    import numpy as np

    plain, numpy_typed = scorer.score([reading(), reading(torque=np.float32(40.0), rotational_speed=np.int64(1500))])
    assert plain == numpy_typed


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from([*HEALTHY, "machine_id", "ts"])


@settings(max_examples=500, deadline=None)
@given(st.lists(json_values | st.dictionaries(field_names, json_values) | st.fixed_dictionaries(
    {k: st.one_of(st.just(v), json_values) for k, v in HEALTHY.items()}), max_size=20))
def test_arbitrary_json_never_raises_and_every_reading_gets_one_result(scorer, readings):
    results = scorer.score(readings)
    assert len(results) == len(readings)
    for raw, result in zip(readings, results):
        if isinstance(result, Rejection):
            assert result.reason in Reason and result.message
        else:
            assert 0.0 <= result.p_failure <= 1.0 and 0.0 <= result.health <= 100.0
            assert all(math.isfinite(raw[name]) for name in HEALTHY if name != "machine_type")
    json.dumps([str(r) for r in results])

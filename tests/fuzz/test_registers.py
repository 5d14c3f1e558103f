"""Fuzzing Modbus register decoding: every type in every word and byte order round-trips; any words a device
sends decode to a number or raise the documented ValueError; a NaN or infinite float never reaches the model."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus import Register
from drivers.registers import (
    ORDERS,
    REGISTER_WORDS,
    ResponseDecoder,
    decode,
    decode_raw,
    decode_response,
    encode,
    encode_raw,
    plan_reads,
)
from model.features import INPUT_NAMES, MACHINE_TYPE_INPUT
from model.validate import Reason, Rejection
from tests.fuzz.strategies import fuzz_settings

TYPES = tuple(REGISTER_WORDS)
INTEGER_RANGES = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1), "int32": (-(2**31), 2**31 - 1),
                  "uint32": (0, 2**32 - 1)}
orders = st.sampled_from(ORDERS)
words = st.integers(min_value=0, max_value=0xFFFF)


def values_of(type_: str):
    if type_ in INTEGER_RANGES:
        low, high = INTEGER_RANGES[type_]
        return st.integers(min_value=low, max_value=high)
    return st.floats(width=32 if type_ == "float32" else 64)  # NaN and ±inf included


def same_number(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@fuzz_settings(short=150, long=15_000)
@given(st.sampled_from(TYPES).flatmap(lambda t: st.tuples(st.just(t), values_of(t), orders)))
def test_every_value_round_trips_in_every_type_and_order(case):
    type_, value, (word_order, byte_order) = case
    registers = encode_raw(value, type_, word_order, byte_order)
    assert len(registers) == REGISTER_WORDS[type_] and all(0 <= w <= 0xFFFF for w in registers)
    decoded = decode_raw(registers, type_, word_order, byte_order)
    if type_ == "float32" and math.isfinite(value):
        assert struct.pack(">f", decoded) == struct.pack(">f", value)  # the shortest decimal, same bits
    else:
        assert same_number(decoded, value)


@fuzz_settings(short=150, long=15_000)
@given(type_=st.sampled_from(TYPES), order=orders,
       sent=st.lists(st.integers(min_value=-(2**20), max_value=2**20), max_size=6))
def test_any_words_decode_to_a_number_or_raise_the_documented_value_error(type_, order, sent):
    try:
        value = decode_raw(sent, type_, *order)
    except ValueError:
        assert len(sent) != REGISTER_WORDS[type_] or any(not 0 <= w <= 0xFFFF for w in sent)
        return
    assert isinstance(value, int if type_ in INTEGER_RANGES else float)
    again = encode_raw(value, type_, *order)  # the words a device sends are exactly what the value encodes to
    assert again == sent or (isinstance(value, float) and math.isnan(value))


@fuzz_settings(short=150, long=15_000)
@given(type_=st.sampled_from(TYPES), value=st.one_of(st.floats(), st.integers(), st.integers(min_value=10**300)),
       order=orders)
def test_encoding_a_value_that_does_not_fit_raises_the_documented_value_error(type_, value, order):
    """Regression: a float beyond float32's range raised OverflowError out of encode_raw and encode."""
    try:
        registers = encode_raw(value, type_, *order)
    except ValueError:
        return
    assert len(registers) == REGISTER_WORDS[type_]


@pytest.mark.parametrize(("value", "type_"), [(1e300, "float32"), (-1e39, "float32"), (math.inf, "int16")])
def test_encode_refuses_what_does_not_fit_with_a_value_error(value, type_):
    with pytest.raises(ValueError, match="does not fit"):
        encode(value, Register(address=0, type=type_))


# One device's map: every model input at its own address, with a random type, orders, scale and offset.
registers_maps = st.fixed_dictionaries({
    name: st.builds(lambda t, order, scale, offset, i=i: Register(address=10 * i, type=t, word_order=order[0],
                                                                   byte_order=order[1], scale=scale, offset=offset),
                    st.sampled_from(TYPES), orders,
                    st.sampled_from([1.0, 0.1, 0.01, -1.0, 10.0]), st.sampled_from([0.0, 273.15, -40.0]))
    for i, name in enumerate(INPUT_NAMES)
})


@fuzz_settings(short=100, long=10_000)
@given(registers=registers_maps, gap=st.integers(min_value=0, max_value=12), data=st.data())
def test_the_compiled_decoder_reads_any_words_as_decode_response_does(registers, gap, data):
    for request in plan_reads(registers, largest_gap=gap):
        sent = data.draw(st.lists(words, min_size=request.count, max_size=request.count + 2))
        expected, got = decode_response(request, sent, registers), ResponseDecoder(request, registers)(sent)
        assert list(got) == list(expected)
        for name, value in expected.items():
            assert (math.isnan(value) and math.isnan(got[name])) or (got[name] == value
                                                                      and type(got[name]) is type(value))


@fuzz_settings(short=100, long=10_000)
@given(registers=registers_maps, data=st.data())
def test_whatever_a_device_sends_the_model_sees_only_finite_values_in_range(scorer, registers, data):
    """Words of NaN and infinite floats (0x7FC0 0x0000, 0x7F80 0x0000...) decode, and the validator rejects them
    as not finite before anything is scored."""
    plan = plan_reads(registers, largest_gap=9)
    special = st.sampled_from([0x7FC0, 0x7F80, 0xFF80, 0x7FF8, 0x7FF0, 0xFFF0, 0x0000, 0xFFFF])
    fields = {}
    for request in plan:
        sent = data.draw(st.lists(st.one_of(words, special), min_size=request.count, max_size=request.count))
        fields.update(decode_response(request, sent, registers))
    fields[MACHINE_TYPE_INPUT] = "M"
    checked = scorer.validator.check(fields)
    if isinstance(checked, Rejection):
        assert checked.reason in (Reason.NOT_FINITE, Reason.OUT_OF_RANGE) and checked.input in INPUT_NAMES
        if any(isinstance(v, float) and not math.isfinite(v) for v in fields.values()):
            assert checked.reason is Reason.NOT_FINITE or checked.input != next(
                n for n in INPUT_NAMES if isinstance(fields[n], float) and not math.isfinite(fields[n]))
    else:
        values, _ = checked
        assert all(math.isfinite(v) for v in values)
    valid, rejected = scorer.validator.validate([fields])
    assert len(valid.index) + len(rejected) == 1
    assert all(math.isfinite(v) for v in valid.values.ravel())


def test_a_nan_float_register_is_rejected_as_not_finite(scorer):
    torque = Register(address=0, type="float32", word_order="little")
    fields = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500, "tool_wear": 10,
              "torque": decode([0x0000, 0x7FC0], torque), MACHINE_TYPE_INPUT: "L"}
    assert math.isnan(fields["torque"])
    rejection = scorer.validator.check(fields)
    assert isinstance(rejection, Rejection)
    assert (rejection.reason, rejection.input) == (Reason.NOT_FINITE, "torque")

"""Register arithmetic from tables of known words: every type in every word and byte order, scale and offset, the
read planner, and the probe's interpretations. Pure: no device, no network.

The vectors are written out by hand from the values' IEEE 754 / two's complement bytes (123.456 as float32 is
0x42F6E979, as float64 0x405EDD2F1A9FBE77; -123456789 as int32 is 0xF8A432EB), not computed with the code under
test.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from drivers.modbus import ModbusTcpDevice, Register
from drivers.probe import display_tolerance, format_rows, interpretations, map_entry, matches
from drivers.registers import (
    MAX_READ_REGISTERS,
    ReadRequest,
    ResponseDecoder,
    decode,
    decode_raw,
    decode_response,
    encode,
    encode_raw,
    order_name,
    plan_reads,
)

BB, LB, BL, LL = ("big", "big"), ("little", "big"), ("big", "little"), ("little", "little")

# (type, (word_order, byte_order), registers as read, value)
VECTORS = [
    # 16-bit: the byte order swaps the two bytes; there is no word order
    ("int16", BB, [0x0000], 0),
    ("int16", BB, [0x7FFF], 32767),
    ("int16", BB, [0x8000], -32768),
    ("int16", BB, [0xFFFE], -2),
    ("int16", BL, [0xFEFF], -2),
    ("int16", BL, [0x3412], 0x1234),
    ("uint16", BB, [0xFFFE], 65534),
    ("uint16", BB, [0x1234], 4660),
    ("uint16", BL, [0x3412], 4660),
    # int32 -123456789 = F8 A4 32 EB
    ("int32", BB, [0xF8A4, 0x32EB], -123456789),
    ("int32", LB, [0x32EB, 0xF8A4], -123456789),
    ("int32", BL, [0xA4F8, 0xEB32], -123456789),
    ("int32", LL, [0xEB32, 0xA4F8], -123456789),
    ("int32", BB, [0x7FFF, 0xFFFF], 2147483647),
    ("int32", BB, [0x8000, 0x0000], -2147483648),
    # uint32 0x12345678 = 305419896
    ("uint32", BB, [0x1234, 0x5678], 305419896),
    ("uint32", LB, [0x5678, 0x1234], 305419896),
    ("uint32", BL, [0x3412, 0x7856], 305419896),
    ("uint32", LL, [0x7856, 0x3412], 305419896),
    ("uint32", BB, [0xFFFF, 0xFFFF], 4294967295),
    # float32 123.456 = 42 F6 E9 79
    ("float32", BB, [0x42F6, 0xE979], 123.456),
    ("float32", LB, [0xE979, 0x42F6], 123.456),
    ("float32", BL, [0xF642, 0x79E9], 123.456),
    ("float32", LL, [0x79E9, 0xF642], 123.456),
    # float32 -1.5 = BF C0 00 00; 1.0 = 3F 80 00 00
    ("float32", BB, [0xBFC0, 0x0000], -1.5),
    ("float32", LB, [0x0000, 0xBFC0], -1.5),
    ("float32", BL, [0xC0BF, 0x0000], -1.5),
    ("float32", LL, [0x0000, 0xC0BF], -1.5),
    ("float32", BB, [0x3F80, 0x0000], 1.0),
    # float64 123.456 = 40 5E DD 2F 1A 9F BE 77
    ("float64", BB, [0x405E, 0xDD2F, 0x1A9F, 0xBE77], 123.456),
    ("float64", LB, [0xBE77, 0x1A9F, 0xDD2F, 0x405E], 123.456),
    ("float64", BL, [0x5E40, 0x2FDD, 0x9F1A, 0x77BE], 123.456),
    ("float64", LL, [0x77BE, 0x9F1A, 0x2FDD, 0x5E40], 123.456),
    # float64 -2.5 = C0 04 00 00 00 00 00 00
    ("float64", BB, [0xC004, 0x0000, 0x0000, 0x0000], -2.5),
    ("float64", LB, [0x0000, 0x0000, 0x0000, 0xC004], -2.5),
    ("float64", BL, [0x04C0, 0x0000, 0x0000, 0x0000], -2.5),
    ("float64", LL, [0x0000, 0x0000, 0x0000, 0x04C0], -2.5),
]


def _id(vector) -> str:
    type_, orders, _, value = vector
    return f"{type_}-{order_name(type_, *orders)}-{value}"


@pytest.mark.parametrize("type_, orders, words, value", VECTORS, ids=[_id(v) for v in VECTORS])
def test_known_words_decode_to_their_value(type_, orders, words, value):
    decoded = decode_raw(words, type_, *orders)
    assert decoded == value
    assert type(decoded) is (float if type_.startswith("float") else int)


@pytest.mark.parametrize("type_, orders, words, value", VECTORS, ids=[_id(v) for v in VECTORS])
def test_values_encode_to_the_known_words(type_, orders, words, value):
    assert encode_raw(value, type_, *orders) == words


def test_every_type_and_order_is_in_the_table():
    covered = {(type_, orders) for type_, orders, _, _ in VECTORS}
    for type_ in ("int32", "uint32", "float32", "float64"):
        assert {o for t, o in covered if t == type_} == {BB, LB, BL, LL}, type_
    for type_ in ("int16", "uint16"):
        assert {o for t, o in covered if t == type_} == {BB, BL}, type_


@pytest.mark.parametrize("type_", ["int16", "uint16"])
def test_a_16_bit_type_has_no_word_order(type_):
    assert decode_raw([0x1234], type_, "little", "big") == decode_raw([0x1234], type_, "big", "big") == 0x1234


def test_float32_decodes_to_the_number_a_display_shows():
    """The float32 nearest 123.456 is 123.45600128173828; the reading is the shortest decimal with the same bits."""
    assert decode_raw([0x42F6, 0xE979], "float32") == 123.456
    assert decode_raw([0x3DCC, 0xCCCD], "float32") == 0.1
    tiny = decode_raw([0x0000, 0x0001], "float32")  # the smallest subnormal still decodes exactly
    assert tiny > 0 and encode_raw(tiny, "float32") == [0x0000, 0x0001]


@pytest.mark.parametrize("words, check", [
    ([0x7FC0, 0x0000], math.isnan),
    ([0x7F80, 0x0000], lambda v: v == math.inf),
    ([0xFF80, 0x0000], lambda v: v == -math.inf),
])
def test_float32_nan_and_infinity_pass_through_for_the_pipeline_to_reject(words, check):
    assert check(decode_raw(words, "float32"))


@pytest.mark.parametrize("register, words, value", [
    (Register(address=0, type="int16", scale=0.1, offset=273.15), [0x00EB], 23.5 + 273.15),
    (Register(address=0, type="int16", scale=0.1, offset=273.15), [0xFFF6], -1.0 + 273.15),
    (Register(address=0, type="uint16", scale=10), [0x0064], 1000.0),
    (Register(address=0, type="int32", word_order="little", scale=0.001), [0x32EB, 0xF8A4], -123456.789),
    (Register(address=0, type="float32", word_order="little", offset=-100), [0xE979, 0x42F6], 23.456),
    (Register(address=0, type="uint16"), [0x0007], 7),
])
def test_scale_and_offset(register, words, value):
    assert decode(words, register) == pytest.approx(value, rel=1e-12)
    assert encode(value, register) == words


@pytest.mark.parametrize("register, words, shown", [
    (Register(address=0, type="int16", scale=0.1), [423], 42.3),  # 423 * 0.1 is 42.300000000000004 in binary
    (Register(address=0, type="int16", scale=0.1, offset=273.15), [202], 293.35),  # 293.34999999999997
    (Register(address=0, type="uint16", scale=0.01, offset=-40), [7123], 31.23),  # 31.230000000000004
    (Register(address=0, type="int32", word_order="little", scale=0.001), [0x32EB, 0xF8A4], -123456.789),
])
def test_a_scaled_integer_is_rounded_to_its_resolution(register, words, shown):
    value = decode(words, register)
    assert value == shown and repr(value) == repr(shown)


def test_a_float_register_is_not_rounded():
    """Its resolution is its own, not the scale's: 123.456 * 0.1 stays 12.3456..., not 12.3."""
    assert decode([0x42F6, 0xE979], Register(address=0, type="float32", scale=0.1)) == 123.456 * 0.1


def test_unscaled_integers_stay_integers():
    assert decode([7], Register(address=0)) == 7 and isinstance(decode([7], Register(address=0)), int)


@pytest.mark.parametrize("call, message", [
    (lambda: decode_raw([1], "int32"), "takes 2 register"),
    (lambda: decode_raw([1, 2, 3], "float64"), "takes 4 register"),
    (lambda: decode_raw([70000], "uint16"), "0..65535"),
    (lambda: encode_raw(70000, "uint16"), "does not fit uint16"),
    (lambda: encode_raw(-1, "uint32"), "does not fit uint32"),
    (lambda: encode_raw(2 ** 31, "int32"), "does not fit int32"),
])
def test_wrong_sizes_and_ranges_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("type_, orders, name", [
    ("float32", BB, "ABCD"), ("float32", LB, "CDAB"), ("float32", BL, "BADC"), ("float32", LL, "DCBA"),
    ("int16", BB, "AB"), ("int16", BL, "BA"),
    ("float64", BB, "ABCDEFGH"), ("float64", LB, "GHEFCDAB"), ("float64", BL, "BADCFEHG"), ("float64", LL, "HGFEDCBA"),
])
def test_order_names(type_, orders, name):
    assert order_name(type_, *orders) == name


# --- planning reads -----------------------------------------------------------------------------------------------

def regs(**spec) -> dict[str, Register]:
    """regs(a=(0, "uint16"), b=(1, "float32", "input")) -> {name: Register}."""
    return {name: Register(address=s[0], type=s[1], table=s[2] if len(s) > 2 else "holding")
            for name, s in spec.items()}


def shape(requests: list[ReadRequest]) -> list[tuple]:
    return [(r.table, r.address, r.count, dict(r.inputs)) for r in requests]


@pytest.mark.parametrize("registers, gap, expected", [
    pytest.param(regs(a=(0, "uint16")), 0, [("holding", 0, 1, {"a": 0})], id="one register"),
    pytest.param(regs(a=(0, "uint16"), b=(1, "float32"), c=(3, "float64")), 0,
                 [("holding", 0, 7, {"a": 0, "b": 1, "c": 3})], id="adjacent: one request"),
    pytest.param(regs(c=(3, "float64"), a=(0, "uint16"), b=(1, "float32")), 0,
                 [("holding", 0, 7, {"a": 0, "b": 1, "c": 3})], id="map order does not matter"),
    pytest.param(regs(a=(0, "uint16"), b=(2, "uint16")), 0,
                 [("holding", 0, 1, {"a": 0}), ("holding", 2, 1, {"b": 0})], id="a gap, largest_gap 0: split"),
    pytest.param(regs(a=(0, "uint16"), b=(2, "uint16")), 1, [("holding", 0, 3, {"a": 0, "b": 2})],
                 id="a gap within largest_gap: merged"),
    pytest.param(regs(a=(0, "uint16"), b=(5, "uint16")), 3,
                 [("holding", 0, 1, {"a": 0}), ("holding", 5, 1, {"b": 0})], id="a gap beyond largest_gap: split"),
    pytest.param(regs(a=(0, "uint16"), b=(0, "int16"), c=(1, "float32")), 0,
                 [("holding", 0, 3, {"a": 0, "b": 0, "c": 1})], id="overlapping registers share words"),
    pytest.param(regs(a=(0, "uint16"), b=(0, "uint16", "input")), 0,
                 [("holding", 0, 1, {"a": 0}), ("input", 0, 1, {"b": 0})], id="tables never merge"),
    pytest.param(regs(a=(0, "uint16"), b=(124, "uint16")), 200, [("holding", 0, 125, {"a": 0, "b": 124})],
                 id="exactly 125 registers: one request"),
    pytest.param(regs(a=(0, "uint16"), b=(125, "uint16")), 200,
                 [("holding", 0, 1, {"a": 0}), ("holding", 125, 1, {"b": 0})], id="126 registers: two requests"),
    pytest.param(regs(a=(0, "uint16"), b=(122, "float64")), 200,
                 [("holding", 0, 1, {"a": 0}), ("holding", 122, 4, {"b": 0})],
                 id="a float64 never straddles the limit"),
    pytest.param(regs(a=(65534, "float32")), 0, [("holding", 65534, 2, {"a": 0})], id="the last registers"),
])
def test_plan(registers, gap, expected):
    assert shape(plan_reads(registers, gap)) == expected


def test_a_long_contiguous_map_takes_as_few_requests_as_the_limit_allows():
    registers = {f"r{i}": Register(address=2 * i, type="float32") for i in range(200)}  # 400 registers
    plan = plan_reads(registers)
    assert [r.count for r in plan] == [124, 124, 124, 28]  # 62 float32 fit in 125 words, the 63rd would not
    assert sum(len(r.inputs) for r in plan) == 200
    assert all(r.count <= MAX_READ_REGISTERS for r in plan)


def test_the_example_devices_plan():
    config = tomllib.loads((Path(__file__).resolve().parents[2] / "examples" / "agent.toml").read_text())
    press = ModbusTcpDevice(**config["modbus"][0])
    plan = plan_reads(press.registers, press.largest_gap)
    assert [r.describe() for r in plan] == [
        "holding register 200 (tool_wear)",
        "input registers 100-105 (air_temperature, process_temperature, rotational_speed, torque)",
    ]


def test_decode_response_picks_each_inputs_words():
    registers = {"speed": Register(address=10, type="uint16"),
                 "torque": Register(address=12, type="float32", word_order="little"),
                 "temp": Register(address=14, type="int16", scale=0.1)}
    (request,) = plan_reads(registers, largest_gap=1)
    assert decode_response(request, [1500, 0xFFFF, 0xE979, 0x42F6, 0xFF9C], registers) == {
        "speed": 1500, "torque": 123.456, "temp": pytest.approx(-10.0)}
    with pytest.raises(ValueError, match="sent 2 registers, not 5"):
        decode_response(request, [1, 2], registers)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and type(a) is type(b))


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (0.1, 0.0), (0.01, 273.15), (-1.0, -40.0)])
@pytest.mark.parametrize("type_, order, words, value", VECTORS)
def test_a_compiled_decoder_reads_each_vector_as_decode_does(type_, order, words, value, scale, offset):
    register = Register(address=7, type=type_, word_order=order[0], byte_order=order[1], scale=scale, offset=offset)
    (request,) = plan_reads({"x": register})
    decoded = ResponseDecoder(request, {"x": register})(words)["x"]
    assert same(decoded, decode(words, register))
    if (scale, offset) == (1.0, 0.0):
        assert decoded == value


def test_a_compiled_decoder_picks_each_inputs_words_and_refuses_a_short_answer():
    registers = {"speed": Register(address=10, type="uint16"),
                 "torque": Register(address=12, type="float32", word_order="little"),
                 "temp": Register(address=14, type="int16", scale=0.1)}
    (request,) = plan_reads(registers, largest_gap=1)
    decoder = ResponseDecoder(request, registers)
    assert decoder([1500, 0xFFFF, 0xE979, 0x42F6, 0xFF9C]) == {"speed": 1500, "torque": 123.456, "temp": -10.0}
    with pytest.raises(ValueError, match="sent 2 registers, not 5"):
        decoder([1, 2])
    with pytest.raises(ValueError, match="0..65535"):
        decoder([1500, 0x10000, 0xE979, 0x42F6, 0xFF9C])


# --- the probe's interpretations ----------------------------------------------------------------------------------

def test_interpretations_cover_every_type_order_and_start():
    rows = interpretations(100, [0x42F6, 0xE979])
    assert {(r.address, r.type, r.order) for r in rows} == {
        (100, "int16", "AB"), (100, "int16", "BA"), (100, "uint16", "AB"), (100, "uint16", "BA"),
        (101, "int16", "AB"), (101, "int16", "BA"), (101, "uint16", "AB"), (101, "uint16", "BA"),
        *((100, t, o) for t in ("int32", "uint32", "float32") for o in ("ABCD", "CDAB", "BADC", "DCBA")),
    }
    assert len(interpretations(0, [0] * 4)) == 4 * 4 + 3 * 3 * 4 + 4  # 16-bit at 4 starts, 32-bit at 3, float64 at 1
    value = {(r.type, r.order): r.value for r in rows if r.address == 100}
    assert value[("float32", "ABCD")] == 123.456 and value[("uint32", "ABCD")] == 0x42F6E979


def test_interpretations_with_scale_and_a_match():
    rows = interpretations(7, [235], table="input", scale=0.1, offset=273.15)
    (int16,) = [r for r in rows if r.type == "int16" and r.order == "AB"]
    assert int16.raw == 235 and int16.value == pytest.approx(296.65)
    text = format_rows(rows, expected=296.65)
    assert "raw" in text and "value" in text and "<= matches" in text


def test_interpretations_show_scaled_integers_at_their_resolution():
    rows = interpretations(0, [423], scale=0.1)
    (int16,) = [r for r in rows if r.type == "int16" and r.order == "AB"]
    assert int16.value == 42.3
    rows = interpretations(0, [202], scale=0.1, offset=273.15)
    assert [r.value for r in rows if r.order == "AB"] == [293.35, 293.35]


def test_matches_find_the_display_value_at_a_decimal_scale():
    rows = interpretations(0, [0x00EB, 0x42F6, 0xE979])  # 235 (tenths of a degree), then float32 123.456 CDAB..
    found = matches(rows, 23.5)
    row, scale = found[0]
    assert (row.address, row.type, row.order, scale) == (0, "int16", "AB", 0.1)
    assert map_entry(row, "air_temperature", scale=scale) == (
        '[modbus.registers.air_temperature]\naddress = 0\ntype = "int16"\nscale = 0.1')
    (float_row, _), *_ = matches(rows, 123.456)
    assert (float_row.address, float_row.type, float_row.order) == (1, "float32", "ABCD")


def test_map_entry_writes_scale_and_offset_in_full():
    (row,) = [r for r in interpretations(0, [0x00EB]) if r.type == "int16" and r.order == "AB"]
    assert map_entry(row, "t", scale=0.0125, offset=1234.567).endswith("\nscale = 0.0125\noffset = 1234.567")


def test_map_entry_round_trips_through_the_config_model():
    rows = interpretations(40, [0x79E9, 0xF642], table="input")
    (row,) = [r for r in rows if r.type == "float32" and r.order == "DCBA"]
    entry = map_entry(row, "torque", offset=-3)
    parsed = Register(**tomllib.loads(entry)["modbus"]["registers"]["torque"])
    assert parsed == Register(address=40, table="input", type="float32", word_order="little", byte_order="little",
                              offset=-3)
    assert decode(list(row.words), parsed) == pytest.approx(123.456 - 3)


def test_format_rows_says_when_nothing_matches():
    text = format_rows(interpretations(0, [1]), expected=99.9)
    assert "no decoding shows 99.9" in text
    assert text.splitlines()[0].split() == ["address", "type", "order", "word_order", "byte_order", "registers",
                                            "value"]


@pytest.mark.parametrize("expected, tolerance", [(23.5, 0.05), (1500, 0.5), (0.125, 0.0005), (296.65, 0.005)])
def test_a_display_value_matches_what_rounds_to_it(expected, tolerance):
    assert display_tolerance(expected) == pytest.approx(tolerance)

    def float_match(value: float) -> bool:
        rows = [r for r in interpretations(0, encode_raw(value, "float32")) if r.type == "float32" and r.order == "ABCD"]
        return any(scale == 1 for _, scale in matches(rows, expected))

    assert float_match(expected + 0.9 * tolerance) and float_match(expected - 0.9 * tolerance)
    assert not float_match(expected + 1.1 * tolerance) and not float_match(expected - 1.1 * tolerance)

"""Modbus register arithmetic, pure and I/O-free: decode register words into numbers, encode numbers into words,
and plan a device's reads into as few requests as the protocol allows.

Orders, in the usual A-B-C-D notation for the bytes of a 32-bit value, most significant first:

    word_order  byte_order  name   registers on the wire for 0x11223344
    big         big         ABCD   0x1122 0x3344   (the Modbus standard's own order)
    little      big         CDAB   0x3344 0x1122   ("word swap", many PLCs' floats)
    big         little      BADC   0x2211 0x4433   ("byte swap")
    little      little      DCBA   0x4433 0x2211

`word_order` says which register holds the high word (big: the first one); `byte_order` says which byte of each
register is the high one (big: the first one, as Modbus sends it). A 16-bit type has no word order.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, Protocol

REGISTER_WORDS: dict[str, int] = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "float64": 4,
}
Order = Literal["big", "little"]
Table = Literal["holding", "input"]

MAX_READ_REGISTERS = 125  # Modbus application protocol 1.1b3, function codes 3 and 4: 1 to 125 registers
ORDERS: tuple[tuple[Order, Order], ...] = (("big", "big"), ("little", "big"), ("big", "little"), ("little", "little"))
_ORDER_NAMES = {("big", "big"): "ABCD", ("little", "big"): "CDAB", ("big", "little"): "BADC",
                ("little", "little"): "DCBA"}


class Register(Protocol):
    """Where one value is read and how it decodes: what this module needs of drivers.modbus.Register."""

    @property
    def address(self) -> int: ...

    @property
    def table(self) -> Table: ...

    @property
    def type(self) -> str: ...

    @property
    def word_order(self) -> Order: ...

    @property
    def byte_order(self) -> Order: ...

    @property
    def scale(self) -> float: ...

    @property
    def offset(self) -> float: ...


_STRUCT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f", "float64": ">d"}


def order_name(type_: str, word_order: Order, byte_order: Order) -> str:
    """ABCD, CDAB, BADC or DCBA; for a 16-bit type AB or BA; for float64 the 8-byte form (ABCDEFGH, ...)."""
    name = _ORDER_NAMES[(word_order, byte_order)]
    words = REGISTER_WORDS[type_]
    if words == 1:
        return name[:2] if byte_order == "big" else "BA"
    if words == 4:
        letters = "ABCDEFGH"
        pairs = [letters[i:i + 2] for i in range(0, 8, 2)]
        if word_order == "little":
            pairs.reverse()
        return "".join(p if byte_order == "big" else p[::-1] for p in pairs)
    return name


def _to_wire(data: bytes, word_order: Order, byte_order: Order) -> list[int]:
    """Big-endian bytes of a value -> the registers a device with these orders sends."""
    pairs = [data[i:i + 2] for i in range(0, len(data), 2)]
    if word_order == "little":
        pairs.reverse()
    return [int.from_bytes(pair, "big" if byte_order == "big" else "little") for pair in pairs]


def _from_wire(words: Sequence[int], word_order: Order, byte_order: Order) -> bytes:
    """The registers a device with these orders sends -> the value's big-endian bytes."""
    pairs = [int(word).to_bytes(2, "big" if byte_order == "big" else "little") for word in words]
    if word_order == "little":
        pairs.reverse()
    return b"".join(pairs)


def decode_raw(words: Sequence[int], type_: str, word_order: Order = "big", byte_order: Order = "big") -> int | float:
    """The number that `words` (16-bit register values, in the order read) hold, before scale and offset."""
    size = REGISTER_WORDS[type_]
    if len(words) != size:
        raise ValueError(f"{type_} takes {size} register(s), got {len(words)}")
    if any(not 0 <= word <= 0xFFFF for word in words):
        raise ValueError(f"register values must be 0..65535, got {list(words)}")
    data = _from_wire(words, word_order, byte_order)
    value = struct.unpack(_STRUCT[type_], data)[0]
    return _shortest_float32(value, data) if type_ == "float32" else value


def _shortest_float32(value: float, data: bytes) -> float:
    """The shortest decimal with the same float32 bits: 123.456 rather than 123.45600128173828, the number a device's
    display shows for these registers."""
    if not math.isfinite(value):
        return value
    for form in _SHORTEST_FORMS:
        candidate = float(form % value)
        if _FLOAT32_PACK(candidate) == data:
            return candidate
    return value


_SHORTEST_FORMS = ("%.6g", "%.7g", "%.8g", "%.9g")  # 9 significant digits tell every float32 apart
_FLOAT32_PACK = struct.Struct(">f").pack


def encode_raw(value: float, type_: str, word_order: Order = "big", byte_order: Order = "big") -> list[int]:
    """The registers a device sends for `value`: the inverse of decode_raw. Raises ValueError when it does not fit."""
    try:
        data = struct.pack(_STRUCT[type_], value)
    except (struct.error, OverflowError) as exc:  # OverflowError: a float beyond float32's range
        raise ValueError(f"{value!r} does not fit {type_}: {exc}") from None
    return _to_wire(data, word_order, byte_order)


def decode(words: Sequence[int], register: Register) -> int | float:
    """A model input's value: decoded * scale + offset. Integers stay integers when there is nothing to scale."""
    raw = decode_raw(words, register.type, register.word_order, register.byte_order)
    return scaled(raw, register.scale, register.offset)


def scaled(raw: float, scale: float, offset: float) -> float:
    """raw * scale + offset. An integer register's value is exact to the decimals of its scale and offset, its
    resolution: 423 * 0.1 is 42.3, not 42.300000000000004. A float register's value is left as it comes."""
    if scale == 1 and offset == 0:
        return raw
    if isinstance(raw, int):
        exact = exact_form(scale, offset)
        if exact is not None:
            units, shift, power = exact
            return (raw * units + shift) / power
    return raw * scale + offset


def exact_form(scale: float, offset: float) -> tuple[int, int, int] | None:
    """(units, shift, power) with scale = units / power and offset = shift / power as they are written (0.1 is 1 /
    10), so that an integer's raw * scale + offset is (raw * units + shift) / power: integer arithmetic, then one
    correctly rounded division (what rounding the float product to these decimals gave, at a tenth of its cost).
    None when the decimals or the integers are beyond what a double holds: then the float product is as good."""
    places = max(decimals(scale), decimals(offset))
    if places > 15:
        return None
    units, shift = (int(Decimal(repr(float(x))).scaleb(places)) for x in (scale, offset))
    if max(abs(units), abs(shift)) >= 2 ** 53:
        return None
    return units, shift, 10 ** places


def decimals(number: float) -> int:
    """The decimal places `number` is written with: 0.1 -> 1, 273.15 -> 2, 10.0 -> 0, 1.5e-07 -> 8."""
    mantissa, _, exponent = repr(float(number)).partition("e")
    places = len(mantissa.partition(".")[2].rstrip("0"))
    return max(0, places - int(exponent or 0))


def encode(value: float, register: Register) -> list[int]:
    """The registers a device holds for a model input's `value` (integer types are rounded): for tests and
    simulators, the inverse of decode."""
    raw = (value - register.offset) / register.scale
    if not register.type.startswith("float"):
        if not math.isfinite(raw):
            raise ValueError(f"{value!r} does not fit {register.type}: not a finite number")
        raw = round(raw)
    return encode_raw(raw, register.type, register.word_order, register.byte_order)


# --- planning reads -----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read request: `count` registers of `table` from `address`, and where each input's words are in it."""

    table: Table
    address: int
    count: int
    inputs: tuple[tuple[str, int], ...]  # (input name, index of its first word in the response)

    @property
    def last(self) -> int:
        return self.address + self.count - 1

    def describe(self) -> str:
        """e.g. "holding registers 100-105 (torque, rotational_speed)"."""
        span = f"{self.address}" if self.count == 1 else f"{self.address}-{self.last}"
        names = ", ".join(name for name, _ in self.inputs)
        return f"{self.table} register{'s' if self.count > 1 else ''} {span} ({names})"


def plan_reads(registers: Mapping[str, Register], largest_gap: int = 0,
               max_count: int = MAX_READ_REGISTERS) -> list[ReadRequest]:
    """Group a device's registers into read requests: per table, in address order, a request grows while the next
    register starts at most `largest_gap` unread registers after its end and the request stays within `max_count`
    registers. Greedy from the lowest address, which gives the fewest requests for these two limits.

    Registers that overlap (two inputs reading the same words) share a request. Requests come out by table, then
    address, so a device is read in the same order at every poll.
    """
    if largest_gap < 0:
        raise ValueError("largest_gap must be 0 or more")
    if not 1 <= max_count <= MAX_READ_REGISTERS:
        raise ValueError(f"max_count must be 1..{MAX_READ_REGISTERS}")
    requests: list[ReadRequest] = []
    for table in ("holding", "input"):
        spans = sorted((reg.address, reg.address + REGISTER_WORDS[reg.type], name)
                       for name, reg in registers.items() if reg.table == table)
        span: tuple[int, int] | None = None  # the request being grown: (start, end)
        members: list[tuple[str, int]] = []
        for first, stop, name in spans:
            if span is not None and first - span[1] <= largest_gap and max(span[1], stop) - span[0] <= max_count:
                span = (span[0], max(span[1], stop))
                members.append((name, first))
                continue
            if span is not None:
                requests.append(_request(table, *span, members))
            span, members = (first, stop), [(name, first)]
        if span is not None:
            requests.append(_request(table, *span, members))
    return requests


def _request(table: Table, start: int, end: int, members: Iterable[tuple[str, int]]) -> ReadRequest:
    return ReadRequest(table, start, end - start, tuple((name, first - start) for name, first in members))


def decode_response(request: ReadRequest, words: Sequence[int],
                    registers: Mapping[str, Register]) -> dict[str, int | float]:
    """A response's words -> {input name: value} for every input the request covers."""
    if len(words) < request.count:
        raise ValueError(f"{request.describe()}: the device sent {len(words)} registers, not {request.count}")
    return {name: decode(words[index:index + REGISTER_WORDS[registers[name].type]], registers[name])
            for name, index in request.inputs}


# --- decoding a response, compiled once per request ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Field:
    """One input of a request, with everything `decode` works out per call worked out once."""

    name: str
    start: int  # first byte in the response
    end: int
    code: str  # its struct format character, big-endian
    unpack: Callable[[bytes], tuple[int | float]]
    wire: tuple[int, ...] | None  # byte order from the wire to big-endian; None: already big-endian (ABCD)
    float32: bool
    exact: tuple[int, int, int] | None  # an integer's value is (raw * units + shift) / power: see exact_form
    scaled: bool  # else the value is the raw value (scale 1, offset 0)
    scale: float
    offset: float


class ResponseDecoder:
    """`decode_response` for one request, with the per-register work (struct formats, byte orders, the decimals of
    scale and offset) done once at construction: a poll decodes its words without re-deriving them. The same values
    as `decode_response`, and a ValueError where it raises one (a word out of 0..65535 anywhere in the response
    included: pymodbus never hands one over)."""

    def __init__(self, request: ReadRequest, registers: Mapping[str, Register]) -> None:
        self.request = request
        self._words = struct.Struct(f">{request.count}H")
        self._fields = tuple(self._field(name, index, registers[name]) for name, index in request.inputs)
        self._joint = self._joint_struct(self._fields)

    @staticmethod
    def _field(name: str, index: int, register: Register) -> _Field:
        size = REGISTER_WORDS[register.type]
        wire: tuple[int, ...] | None = None
        if (register.word_order, register.byte_order) != ("big", "big"):
            # Where each byte of the big-endian value is on the wire: decode_raw's _from_wire, as an index map.
            probe = bytes(range(2 * size))
            wire = tuple(_from_wire(_words_of(probe), register.word_order, register.byte_order))
        integer = not register.type.startswith("float")
        scaled = not (register.scale == 1 and register.offset == 0)
        code = _STRUCT[register.type]
        return _Field(name, 2 * index, 2 * (index + size), code[1:], struct.Struct(code).unpack, wire,
                      register.type == "float32", exact_form(register.scale, register.offset) if integer and scaled
                      else None, scaled, register.scale, register.offset)

    @staticmethod
    def _joint_struct(fields: tuple[_Field, ...]) -> Callable[[bytes], tuple[int | float, ...]] | None:
        """One unpack for every field, when all are big-endian (ABCD) and none overlaps another: the fields' formats
        in a row, with pad bytes over the words between them."""
        layout, at = ">", 0
        for field in fields:
            if field.wire is not None or field.start < at:
                return None
            layout += "x" * (field.start - at) + field.code
            at = field.end
        return struct.Struct(layout).unpack_from

    def __call__(self, words: Sequence[int]) -> dict[str, int | float]:
        count = self.request.count
        if len(words) < count:
            raise ValueError(f"{self.request.describe()}: the device sent {len(words)} registers, not {count}")
        try:
            data = self._words.pack(*words[:count])
        except struct.error:
            raise ValueError(f"register values must be 0..65535, got {list(words[:count])}") from None
        raws = self._joint(data) if self._joint is not None else [_raw_of(field, data) for field in self._fields]
        values: dict[str, int | float] = {}
        for field, raw in zip(self._fields, raws):
            if field.float32:
                raw = _shortest_float32(raw, _FLOAT32_PACK(raw))
            if field.exact is not None:
                units, shift, power = field.exact
                values[field.name] = (raw * units + shift) / power
            elif field.scaled:
                values[field.name] = raw * field.scale + field.offset
            else:
                values[field.name] = raw
        return values



def _raw_of(field: _Field, data: bytes) -> int | float:
    chunk = data[field.start:field.end]
    if field.wire is not None:
        chunk = bytes([chunk[i] for i in field.wire])
    return field.unpack(chunk)[0]


def _words_of(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]

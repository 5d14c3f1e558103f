"""`pdm-edge modbus probe`: read a few registers from a device and show every way they decode, so that a user can
find the number the machine's display shows and copy the matching register map entry.

    rows = probe(host="192.168.10.21", unit_id=1, address=104, count=2, table="input")
    print(format_rows(rows, expected=23.5))     # the rows that show 23.5 (at some decimal scale) are marked
    print(map_entry(rows[0], "torque"))          # a [modbus.registers.torque] table to paste

`probe` opens one connection, reads once and closes; it raises ProbeError with what to check when the device
cannot be reached, does not answer, or answers with a Modbus exception. The rest is pure.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass

from drivers.modbus_link import (
    ConnectFailed,
    ConnectionLost,
    DeviceException,
    Link,
    ModbusSetupError,
    RequestTimeout,
    quiet_library,
)
from drivers.registers import MAX_READ_REGISTERS, ORDERS, REGISTER_WORDS, Order, decode_raw, order_name, scaled

SCALES = (1.0, 0.1, 0.01, 0.001, 10.0, 100.0)  # tried by `matches`: the decimal scalings PLCs use


class ProbeError(Exception):
    """The device could not be read; the message says what to check."""


@dataclass(frozen=True, slots=True)
class ProbeRow:
    """One way to read the registers from `address`: a type in one word and byte order."""

    table: str
    address: int
    type: str
    word_order: Order
    byte_order: Order
    words: tuple[int, ...]
    raw: int | float
    value: int | float  # raw * scale + offset

    @property
    def order(self) -> str:
        return order_name(self.type, self.word_order, self.byte_order)


def interpretations(address: int, words: Sequence[int], table: str = "holding", scale: float = 1.0,
                    offset: float = 0.0) -> list[ProbeRow]:
    """Every decoding of `words` (read from `address` on): each start address, each type that fits in the words
    left, each word order (for multi-register types) and byte order."""
    rows = []
    for start in range(len(words)):
        for type_, size in REGISTER_WORDS.items():
            if start + size > len(words):
                continue
            chunk = tuple(words[start:start + size])
            orders = [o for o in ORDERS if o[0] == "big"] if size == 1 else ORDERS
            for word_order, byte_order in orders:
                raw = decode_raw(chunk, type_, word_order, byte_order)
                value = scaled(raw, scale, offset)
                rows.append(ProbeRow(table, address + start, type_, word_order, byte_order, chunk, raw, value))
    return rows


def matches(rows: Sequence[ProbeRow], expected: float,
            tolerance: float | None = None) -> list[tuple[ProbeRow, float]]:
    """The rows whose value, times one of the usual decimal scales, shows as `expected`: (row, scale) pairs, the
    plainest first (scale 1, 16-bit types, standard order). A display rounds: by default a value matches when it
    rounds to `expected` at the decimals `expected` is written with (23.5 matches 23.46 to 23.54)."""
    if tolerance is None:
        tolerance = display_tolerance(expected)
    found = []
    for row in rows:
        if isinstance(row.value, float) and not math.isfinite(row.value):
            continue
        for scale in SCALES:
            if abs(row.value * scale - expected) <= tolerance:
                found.append((row, scale))
                break
    rank = {scale: i for i, scale in enumerate(SCALES)}
    return sorted(found, key=lambda pair: (rank[pair[1]], REGISTER_WORDS[pair[0].type],
                                         (pair[0].word_order, pair[0].byte_order) != ("big", "big")))


def display_tolerance(expected: float) -> float:
    """Half a unit of the last decimal `expected` is written with: 23.5 -> 0.05, 1500 -> 0.5."""
    text = repr(float(expected))
    if "e" in text or "E" in text:
        return abs(expected) * 1e-6
    decimals = len(text.split(".")[1].rstrip("0"))
    return 0.5 * 10.0 ** -decimals * (1 + 1e-9)


def _show(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.10g}"


def format_rows(rows: Sequence[ProbeRow], expected: float | None = None) -> str:
    """A table of the rows; with `expected`, the rows that match it are marked with `<=` and the scale."""
    marked = {id(row): scale for row, scale in (matches(rows, expected) if expected is not None else [])}
    scaled = any(row.value != row.raw for row in rows)
    header = ["address", "type", "order", "word_order", "byte_order", "registers", "raw" if scaled else "value"]
    if scaled:
        header.append("value")
    lines = [header]
    for row in rows:
        line = [str(row.address), row.type, row.order, row.word_order if REGISTER_WORDS[row.type] > 1 else "-",
                row.byte_order, " ".join(f"{w:04X}" for w in row.words), _show(row.raw)]
        if scaled:
            line.append(_show(row.value))
        if id(row) in marked:
            scale = marked[id(row)]
            line.append("<= " + ("matches" if scale == 1 else f"matches with scale = {scale:g}"))
        lines.append(line)
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(widths[i]) if i < len(widths) else cell for i, cell in enumerate(line))
                     .rstrip() for line in lines)
    if expected is not None and not marked:
        text += f"\nno decoding shows {expected:g} (at scales {', '.join(f'{s:g}' for s in SCALES)}); " \
                "check the address, the table and the unit id"
    return text


def map_entry(row: ProbeRow, name: str = "<input>", scale: float = 1.0, offset: float = 0.0) -> str:
    """The `[modbus.registers.<name>]` table that reads `row` (default keys left out)."""
    lines = [f"[modbus.registers.{name}]", f"address = {row.address}"]
    if row.table != "holding":
        lines.append(f'table = "{row.table}"')
    lines.append(f'type = "{row.type}"')
    if REGISTER_WORDS[row.type] > 1 and row.word_order != "big":
        lines.append(f'word_order = "{row.word_order}"')
    if row.byte_order != "big":
        lines.append(f'byte_order = "{row.byte_order}"')
    if scale != 1:
        lines.append(f"scale = {scale:.15g}")
    if offset != 0:
        lines.append(f"offset = {offset:.15g}")
    return "\n".join(lines)


def probe(*, address: int, count: int = 2, table: str = "holding", unit_id: int = 1, host: str | None = None,
          port: int = 502, serial_port: str | None = None, baudrate: int = 19200, parity: str = "E",
          stopbits: int = 1, timeout_s: float = 2.0, scale: float = 1.0, offset: float = 0.0) -> list[ProbeRow]:
    """Read `count` registers of `table` from `address` of one device, over TCP (`host`, `port`) or a serial line
    (`serial_port`, ...), and return every interpretation. Raises ProbeError (ValueError for bad arguments)."""
    if (host is None) == (serial_port is None):
        raise ValueError("give either host (Modbus TCP) or serial_port (Modbus RTU)")
    if table not in ("holding", "input"):
        raise ValueError(f"table must be holding or input, not {table!r}")
    if not 1 <= count <= MAX_READ_REGISTERS:
        raise ValueError(f"count must be 1..{MAX_READ_REGISTERS} (the most one Modbus read returns)")
    if not 0 <= address <= 65535 or address + count > 65536:
        raise ValueError(f"registers {address}..{address + count - 1} are outside 0..65535")
    if timeout_s <= 0:
        raise ValueError("timeout_s must be more than 0")
    quiet_library()
    try:
        link = Link.tcp(host, port, timeout_s) if host is not None \
            else Link.rtu(serial_port or "", baudrate, parity, stopbits, timeout_s)
    except ModbusSetupError as exc:
        raise ProbeError(str(exc)) from None
    words = asyncio.run(_read(link, address, count, table, unit_id, timeout_s, serial=host is None))
    return interpretations(address, words, table, scale, offset)


async def _read(link: Link, address: int, count: int, table: str, unit_id: int, timeout_s: float, *,
                serial: bool) -> list[int]:
    span = f"{table} register{'s' if count > 1 else ''} {address}" + (f"-{address + count - 1}" if count > 1 else "")
    where = f"unit {unit_id} at {link.name}"
    try:
        return await link.read(table, address, count, unit_id, timeout_s)
    except ConnectFailed as exc:
        if "check" in str(exc):  # it says already what to check
            raise ProbeError(str(exc)) from None
        check = "the serial port's path and permissions" if serial else "the host, the port and the firewall"
        raise ProbeError(f"{exc}; check {check}") from None
    except RequestTimeout:
        check = "the unit id, the baud rate, parity and stop bits, and the wiring (A/B swapped?)" if serial \
            else "the unit id (many TCP devices answer only to theirs, some only to 1 or 255)"
        raise ProbeError(f"{where} did not answer a read of {span} within {timeout_s:g} s; check {check}") from None
    except ConnectionLost as exc:
        raise ProbeError(f"{where}: {exc} (reading {span}); the device may allow fewer connections, or "
                         "another program holds its connection") from None
    except DeviceException as exc:
        hint = "it has no register at some of these addresses: read fewer, or from another address or table" \
            if exc.code == 2 else exc.hint or "see the device manual"
        raise ProbeError(f"{where} answered {exc} to a read of {span}: {hint}") from None
    finally:
        link.close()

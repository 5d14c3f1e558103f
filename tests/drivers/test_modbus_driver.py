"""The Modbus driver against real pymodbus servers: over TCP on 127.0.0.1, and over RTU on a serial line made of a
pseudo-terminal pair (testkit/modbus.py).

- A map with every type in every order, both tables, scale and offset: each reading holds exactly the values the
  server holds, read in as few requests as the map allows.
- RTU: two unit ids share one line, one request at a time, with the inter-frame pause.
- Faults, each a test: a device that stops answering, one that answers with an exception, one that closes the
  connection mid-request, one switched off and on again; each is logged once when it goes and once when it is back,
  and comes back without restarting the driver.
- A device slower than its interval is polled again as soon as a poll ends, one poll at a time, the ticks it missed
  counted; 50 devices of which 5 are dead: the live ones are polled on time.
- The probe reads a real device and says clearly why it could not.

Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
import os
import re
import statistics
import termios
import threading
import time
from collections.abc import Callable
from itertools import pairwise

import pytest

from drivers.base import RawReading
from drivers.modbus import (
    GRID_SLOTS,
    ModbusDriver,
    ModbusRtuDevice,
    ModbusTcpDevice,
    Register,
    backoff_s,
    check_lines,
    grid_phases,
)
from drivers.modbus_link import Link, ModbusSetupError
from drivers.probe import ProbeError, format_rows, matches, probe
from drivers.registers import encode, plan_reads
from testkit.modbus import ModbusServers, ModbusUnit
from testkit.net import LOCALHOST, free_port

TYPE_KEY = "Type"


def needs_pyserial():
    """RTU tests need pyserial (pymodbus[serial]): skipped without it on a developer's machine, failed in CI."""
    if importlib.util.find_spec("serial") is None:
        message = "Modbus RTU needs pyserial: install pymodbus[serial]"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class Recorder:
    """A sink that keeps what it is given; put() may be made to block, like a full pipeline."""

    def __init__(self) -> None:
        self.readings: list[RawReading] = []
        self.open = threading.Event()
        self.open.set()
        self._lock = threading.Lock()

    def put(self, reading: RawReading) -> None:
        self.open.wait()
        with self._lock:
            self.readings.append(reading)

    def of(self, machine_id: str) -> list[RawReading]:
        with self._lock:
            return [r for r in self.readings if r.machine_id == machine_id]


def until(condition: Callable[[], object], timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g} s")
        time.sleep(0.01)


def tcp(machine_id: str, port: int, registers: dict[str, Register], **keys) -> ModbusTcpDevice:
    keys = {"interval_s": 0.1, "timeout_s": 0.5, "retries": 1, "backoff_max_s": 0.4, **keys}
    return ModbusTcpDevice(transport="tcp", machine_id=machine_id, machine_type="M", host=LOCALHOST, port=port,
                           registers=registers, **keys)


@pytest.fixture
def servers():
    with ModbusServers() as servers:
        yield servers


@pytest.fixture
def driver_for():
    """driver_for(devices) -> (driver, sink), started; closed at the end of the test."""
    started = []

    def start(devices, sink=None):
        sink = sink or Recorder()
        driver = ModbusDriver(devices, TYPE_KEY)
        driver.start(sink)
        started.append(driver)
        return driver, sink

    yield start
    for driver in started:
        driver.close()


def device_status(driver: ModbusDriver, machine_id: str) -> dict:
    return driver.status()["devices"][machine_id]


def log_lines(caplog, *parts: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if all(p in r.getMessage() for p in parts)]


@pytest.fixture(autouse=True)
def _driver_logs(caplog):
    caplog.set_level(logging.INFO, logger="drivers.modbus")


# --- decoding against a real server -------------------------------------------------------------------------------

B, L = "big", "little"
MIXED = {  # input name -> (register, the value the device holds)
    "h_int16": (Register(address=0, type="int16"), -12345),
    "h_int16_ba": (Register(address=1, type="int16", byte_order=L), -2),
    "h_uint16": (Register(address=2, type="uint16"), 65000),
    "h_uint16_scaled": (Register(address=3, type="uint16", scale=0.1, offset=273.15), 235 * 0.1 + 273.15),
    "h_int32_abcd": (Register(address=4, type="int32"), -123456789),
    "h_int32_cdab": (Register(address=6, type="int32", word_order=L), -2),
    "h_uint32_badc": (Register(address=8, type="uint32", byte_order=L), 305419896),
    "h_uint32_dcba": (Register(address=10, type="uint32", word_order=L, byte_order=L), 4000000000),
    "h_float32_abcd": (Register(address=12, type="float32"), 123.456),
    "h_float32_cdab": (Register(address=14, type="float32", word_order=L), -1.5),
    "h_float32_badc": (Register(address=16, type="float32", byte_order=L), 0.1),
    "h_float32_dcba": (Register(address=18, type="float32", word_order=L, byte_order=L), 3.4e38),
    "i_float64_abcd": (Register(address=100, table="input", type="float64"), 123.456),
    "i_float64_cdab": (Register(address=104, table="input", type="float64", word_order=L), -2.5e-300),
    "i_float64_badc": (Register(address=108, table="input", type="float64", byte_order=L), 1e300),
    "i_float64_dcba": (Register(address=112, table="input", type="float64", word_order=L, byte_order=L), 42.0),
    "i_int32_scaled": (Register(address=120, table="input", type="int32", word_order=L, scale=0.001), -123456.789),
    "i_float32_offset": (Register(address=130, table="input", type="float32", offset=-100), 23.456),
}


def test_a_mixed_map_over_tcp_reads_exactly_the_values_the_server_holds(servers, driver_for):
    unit = ModbusUnit(input=dict.fromkeys(range(100, 132), 0))  # the gaps a merged request spans exist too
    for register, value in MIXED.values():
        unit.set(register.table, register.address, encode(value, register))
    port = servers.tcp({1: unit})
    registers = {name: register for name, (register, _) in MIXED.items()}
    device = tcp("press-1", port, registers, interval_s=0.2, largest_gap=10)
    driver, sink = driver_for([device])
    until(lambda: len(sink.of("press-1")) >= 3, what="3 readings")
    driver.stop()

    expected = {name: register.scale * round((value - register.offset) / register.scale) + register.offset
                if not register.type.startswith("float") else value for name, (register, value) in MIXED.items()}
    for reading in sink.of("press-1"):
        fields = dict(reading.fields)
        assert fields.pop(TYPE_KEY) == "M"
        for name, value in expected.items():
            register = registers[name]
            if register.scale == 1 and register.offset == 0:
                assert fields[name] == value, name  # exactly: integers as integers, floats to the bit
            else:
                assert fields[name] == pytest.approx(value, rel=1e-12), name
        assert set(fields) == set(MIXED)
        assert reading.source == "modbus:press-1" and reading.rejection is None
        assert reading.payload == ""  # the pipeline writes the fields as JSON only for a quarantined reading
        assert reading.ts <= reading.received_at < reading.ts + 1

    # holding 0-19 in one request; input 100-115, 120-121 and 130-131 within largest_gap 10: one more.
    plan = plan_reads(registers, largest_gap=10)
    assert [(r.table, r.address, r.count) for r in plan] == [("holding", 0, 20), ("input", 100, 32)]
    status = device_status(driver, "press-1")
    assert status["requests_per_poll"] == 2
    assert unit.requests == status["requests"] == 2 * status["polls"]
    assert status["readings"] == len(sink.of("press-1")) and status["failed_polls"] == 0


def test_readings_are_taken_on_the_interval_grid(servers, driver_for):
    port = servers.tcp({1: ModbusUnit(holding={0: 1})})
    _, sink = driver_for([tcp("m", port, {"x": Register(address=0)}, interval_s=0.05)])
    until(lambda: len(sink.of("m")) >= 20, what="20 readings")
    ts = [r.ts for r in sink.of("m")]
    # A request is sent at its tick or, on a busy machine, a little after it: within the interval it belongs to.
    ticks = [math.floor(t / 0.05) for t in ts]
    assert all(b - a >= 1 for a, b in pairwise(ticks)), "two readings in one interval"
    # On the grid, not `interval_s` after the previous poll: a drifting schedule would spread these over the interval.
    assert statistics.median(t - k * 0.05 for t, k in zip(ts, ticks, strict=True)) < 0.0125


def test_devices_at_one_interval_are_spread_evenly_over_it(servers, driver_for):
    port = servers.tcp({1: ModbusUnit(holding={0: 1})})
    names = ["a", "b", "c", "d"]
    driver, sink = driver_for([tcp(name, port, {"x": Register(address=0)}, interval_s=0.2) for name in names]
                              + [tcp("other", port, {"x": Register(address=0)}, interval_s=0.3)])
    until(lambda: all(len(sink.of(name)) >= 5 for name in names), what="5 readings of each device")
    assert [device_status(driver, name)["phase_s"] for name in [*names, "other"]] == pytest.approx([0, 0.05, 0.1, 0.15, 0])
    for i, name in enumerate(names):
        # Device i of 4 polls 50 ms after device i - 1: its requests are sent at k * 0.2 + i * 0.05, or a little later.
        late = [(r.ts - i * 0.05) % 0.2 for r in sink.of(name)]
        assert statistics.median(late) < 0.0125, (name, late)


def test_many_devices_share_the_slots_of_their_interval_in_turn():
    devices = [tcp(f"m{i}", 502, {"x": Register(address=0)}, interval_s=1.0) for i in range(45)]
    devices.insert(3, tcp("fast", 502, {"x": Register(address=0)}, interval_s=0.5))
    phases = dict(zip((d.machine_id for d in devices), grid_phases(devices), strict=True))
    assert phases["fast"] == 0  # alone at its interval
    slots = [phases[f"m{i}"] for i in range(45)]
    assert slots[:GRID_SLOTS] == pytest.approx([i / GRID_SLOTS for i in range(GRID_SLOTS)])
    assert slots[GRID_SLOTS:] == slots[:45 - GRID_SLOTS]  # neighbours in the list in different slots


# --- RTU ----------------------------------------------------------------------------------------------------------

def test_two_unit_ids_share_one_serial_line(servers, driver_for):
    needs_pyserial()
    units = {2: ModbusUnit(holding={0: 1111, 1: 0x42F6, 2: 0xE979}), 3: ModbusUnit(input={7: 0xFFFE})}
    line = servers.rtu(units)
    pause_ms = 30
    rtu = {"transport": "rtu", "machine_type": "L", "serial_port": line, "parity": "N", "interval_s": 0.01,
           "timeout_s": 0.5, "frame_pause_ms": pause_ms}
    devices = [
        ModbusRtuDevice(machine_id="grinder-2", unit_id=2, **rtu, registers={
            "speed": Register(address=0), "torque": Register(address=1, type="float32")}),
        ModbusRtuDevice(machine_id="grinder-3", unit_id=3, **rtu, registers={
            "wear": Register(address=7, table="input", type="int16")}),
    ]
    driver, sink = driver_for(devices)
    until(lambda: len(sink.of("grinder-2")) >= 4 and len(sink.of("grinder-3")) >= 4, what="4 readings from each")
    driver.stop()

    assert {r.fields["speed"] for r in sink.of("grinder-2")} == {1111}
    assert {r.fields["torque"] for r in sink.of("grinder-2")} == {123.456}
    assert {r.fields["wear"] for r in sink.of("grinder-3")} == {-2}
    assert {r.fields[TYPE_KEY] for r in sink.readings} == {"L"}
    status = driver.status()["devices"]
    assert status["grinder-2"]["link"] == status["grinder-3"]["link"] == line
    assert units[2].max_in_flight == units[3].max_in_flight == 1
    # The line takes one request at a time, then stays silent for the pause: with both devices polling every 10 ms,
    # their requests queue for the line, and follow each other no closer than the pause.
    sent = sorted(r.ts for r in sink.readings)
    gaps = [b - a for a, b in pairwise(sent)]
    assert gaps and min(gaps) >= pause_ms / 1000 * 0.9, gaps


def test_devices_on_one_serial_port_must_agree_on_its_settings():
    line = {"transport": "rtu", "machine_type": "L", "serial_port": "/dev/ttyUSB0",
            "registers": {"x": Register(address=0)}}
    devices = [ModbusRtuDevice(machine_id="a", unit_id=1, **line),
               ModbusRtuDevice(machine_id="b", unit_id=2, baudrate=9600, **line)]
    (problem,) = check_lines(devices)
    assert problem.startswith("modbus[1].baudrate = 9600 differs from modbus[0].baudrate = 19200 on /dev/ttyUSB0")
    with pytest.raises(ModbusSetupError, match="baudrate"):
        ModbusDriver(devices, TYPE_KEY)


def test_unit_id_0_is_refused_on_a_serial_line():
    with pytest.raises(ValueError, match="0 is broadcast"):
        ModbusRtuDevice(transport="rtu", machine_id="a", machine_type="L", serial_port="/dev/ttyS0", unit_id=0,
                        registers={"x": Register(address=0)})


# --- faults -------------------------------------------------------------------------------------------------------

def test_a_device_that_stops_answering_is_logged_once_retried_with_backoff_and_comes_back(servers, driver_for,
                                                                                          caplog):
    silent, healthy = ModbusUnit(holding={0: 1}), ModbusUnit(holding={0: 2})
    port, other_port = servers.tcp({1: silent}), servers.tcp({1: healthy})
    devices = [tcp("mill", port, {"x": Register(address=0)}, timeout_s=0.1, retries=1, backoff_max_s=0.4),
               tcp("lathe", other_port, {"x": Register(address=0)})]
    driver, sink = driver_for(devices)
    until(lambda: len(sink.of("mill")) >= 2, what="readings before the fault")

    silent.delay_s = math.inf
    until(lambda: not device_status(driver, "mill")["available"], what="the device marked unavailable")
    # Backed off: after a few failures the next attempt is more than an interval away.
    until(lambda: device_status(driver, "mill")["retry_in_s"] > 0.15, what="a wait longer than the interval")
    status = device_status(driver, "mill")
    assert status["failed_polls"] >= 2
    assert status["timeouts"] >= 2 * status["failed_polls"] - 1  # each failed poll: a request and its retry
    assert status["last_error"] == "holding register 0 (x): no answer within 0.1 s"

    silent.tables["holding"][0] = 7
    silent.delay_s = 0
    until(lambda: any(r.fields["x"] == 7 for r in sink.of("mill")), what="a reading after the device came back")
    assert device_status(driver, "mill")["available"]
    assert len(log_lines(caplog, "mill", "unavailable")) == 1
    assert len(log_lines(caplog, "mill", "available again")) == 1
    assert not log_lines(caplog, "lathe")
    # The healthy device was polled on every tick of its grid throughout.
    phase = device_status(driver, "lathe")["phase_s"]
    ticks = sorted(round((r.ts - phase) / 0.1) for r in sink.of("lathe"))
    assert max(b - a for a, b in pairwise(ticks)) == 1


def test_a_device_switched_off_and_on_again_is_reconnected_without_a_restart(servers, driver_for, caplog):
    unit = ModbusUnit(holding={0: 1})
    port = servers.tcp({1: unit})
    driver, sink = driver_for([tcp("press", port, {"x": Register(address=0)}, backoff_max_s=0.3)])
    until(lambda: len(sink.of("press")) >= 2, what="readings before the fault")

    servers.stop(port)
    until(lambda: device_status(driver, "press")["connect_failures"] >= 3, what="3 refused connections")
    assert not device_status(driver, "press")["available"]
    assert device_status(driver, "press")["last_error"].startswith(f"cannot open 127.0.0.1:{port}")

    unit.tables["holding"][0] = 2
    servers.tcp({1: unit}, port)
    until(lambda: any(r.fields["x"] == 2 for r in sink.of("press")), what="a reading after the restart")
    assert len(log_lines(caplog, "press", "unavailable")) == 1
    assert len(log_lines(caplog, "press", "available again")) == 1


def test_an_exception_response_names_device_register_and_code_once_then_is_counted(servers, driver_for, caplog):
    port = servers.tcp({1: ModbusUnit(holding={0: 1, 1: 2})})
    registers = {"speed": Register(address=0), "wear": Register(address=50, type="uint32")}
    driver, sink = driver_for([tcp("drill", port, registers)])
    until(lambda: device_status(driver, "drill")["exceptions"].get("illegal_address", 0) >= 5,
          what="5 exception responses")
    (line,) = log_lines(caplog, "drill", "answered")
    assert "drill" in line and "holding registers 50-51 (wear)" in line
    assert "exception 2 (IllegalAddress)" in line and "check address, table and type" in line
    status = device_status(driver, "drill")
    assert status["readings"] == 0 and status["failed_polls"] >= 5
    assert status["retries"] == 0  # an illegal address stays illegal: no retry
    assert sink.readings == []  # an incomplete reading is not handed on
    # It answers, but yields no reading: down (after DOWN_AFTER_POLLS polls), saying why, logged once.
    assert not status["available"]
    assert status["last_error"] == "holding registers 50-51 (wear): exception 2 (IllegalAddress)"
    assert driver.status()["available"] == 0
    assert len(log_lines(caplog, "drill", "unavailable")) == 1

    servers.stop(port)  # the device's program is fixed: register 50-51 exists
    servers.tcp({1: ModbusUnit(holding={0: 1, 1: 2, 50: 0, 51: 7})}, port)
    until(lambda: len(sink.of("drill")) >= 1, what="a reading once the register exists")
    assert sink.of("drill")[0].fields["wear"] == 7
    assert device_status(driver, "drill")["available"]
    assert len(log_lines(caplog, "drill", "available again")) == 1


def test_a_connection_closed_mid_request_is_retried_counted_and_recovers(servers, driver_for, caplog):
    port = servers.closer()
    device = tcp("saw", port, {"x": Register(address=0)}, timeout_s=2.0, retries=2, backoff_max_s=0.3)
    driver, sink = driver_for([device])
    until(lambda: device_status(driver, "saw")["failed_polls"] >= 2, what="2 failed polls")
    status = device_status(driver, "saw")
    assert not status["available"] and status["timeouts"] == 0
    assert status["connection_losses"] >= 3 * 2 - 1  # the request and both retries, each cut
    assert status["last_error"] == "holding register 0 (x): the connection was closed during the request"
    assert status["last_poll_ms"] < 500  # seen when it happens, not after timeout_s

    servers.stop(port)
    servers.tcp({1: ModbusUnit(holding={0: 9})}, port)
    until(lambda: len(sink.of("saw")) >= 2, what="readings once the device behaves")
    assert {r.fields["x"] for r in sink.of("saw")} == {9}
    assert len(log_lines(caplog, "saw", "unavailable")) == 1
    assert len(log_lines(caplog, "saw", "available again")) == 1


# --- nothing ends unseen: faults the driver does not expect ---------------------------------------------------------

class Fault:
    """A test double for a library raising what the driver does not expect: `cls.method` raises `error` while
    `on` is set (or for its first `times` calls), and otherwise does what it did."""

    def __init__(self, monkeypatch, cls: type, method: str, error: BaseException, times: int | None = None) -> None:
        original = getattr(cls, method)
        self.on = threading.Event()
        self.on.set()
        self.raised = 0
        fault = self

        async def faulty(link, *args, **kwargs):
            if fault.on.is_set() and (times is None or fault.raised < times):
                fault.raised += 1
                raise error
            return await original(link, *args, **kwargs)

        monkeypatch.setattr(cls, method, faulty)


def error_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("error", [termios.error(22, "Invalid argument"), RuntimeError("a library's bug")],
                         ids=["termios.error", "RuntimeError"])
@pytest.mark.parametrize("method", ["open", "read_timed"], ids=["in open", "in a poll"])
def test_an_unexpected_error_is_logged_once_counted_shown_down_retried_with_backoff_and_recovers(
        servers, driver_for, caplog, monkeypatch, method, error):
    port = servers.tcp({1: ModbusUnit(holding={0: 5})})
    fault = Fault(monkeypatch, Link, method, error)
    driver, sink = driver_for([tcp("press", port, {"x": Register(address=0)}, backoff_max_s=0.4)])
    until(lambda: device_status(driver, "press")["internal_errors"] >= 3, what="3 attempts")
    status = device_status(driver, "press")
    assert not status["available"] and driver.status()["available"] == 0
    assert status["last_error"] == f"unexpected error: {error!r}"
    until(lambda: device_status(driver, "press")["retry_in_s"] > 0.15, what="a wait longer than the interval")
    (logged,) = error_lines(caplog)  # once, with its traceback, however often it happens
    assert "press" in logged.getMessage() and "unexpected error" in logged.getMessage() and logged.exc_info
    assert len(log_lines(caplog, "press", "unavailable")) == 1

    fault.on.clear()
    until(lambda: len(sink.of("press")) >= 2, what="readings once the fault is gone")
    assert {r.fields["x"] for r in sink.of("press")} == {5}
    assert device_status(driver, "press")["available"]
    assert len(log_lines(caplog, "press", "available again")) == 1
    assert len(error_lines(caplog)) == 1


class Escaped(BaseException):
    """What `except Exception` does not catch: it ends the task it is raised in."""


def test_a_device_task_that_ends_is_logged_counted_and_started_again(servers, driver_for, caplog, monkeypatch):
    port = servers.tcp({1: ModbusUnit(holding={0: 5})})
    fault = Fault(monkeypatch, Link, "open", Escaped("gone"), times=1)
    driver, sink = driver_for([tcp("press", port, {"x": Register(address=0)})])
    until(lambda: len(sink.of("press")) >= 2, what="readings after the task was started again")
    assert fault.raised == 1
    assert device_status(driver, "press")["internal_errors"] == 1
    (logged,) = error_lines(caplog)
    assert "press" in logged.getMessage() and "task ended (Escaped('gone')); started again" in logged.getMessage()


def refuse_even_parity(monkeypatch) -> None:
    """The serial port refuses even parity as some USB adapters (and a pseudo-terminal, sometimes) do: pyserial
    raises termios.error, which is no OSError."""
    import serial.serialposix

    original = serial.serialposix.Serial._reconfigure_port

    def reconfigure(port, *args, **kwargs):
        if port.parity == "E":
            raise termios.error(22, "Invalid argument")
        return original(port, *args, **kwargs)

    monkeypatch.setattr(serial.serialposix.Serial, "_reconfigure_port", reconfigure)


def test_a_serial_port_that_refuses_its_settings_shows_the_device_down_saying_why(servers, driver_for, caplog,
                                                                                  monkeypatch):
    needs_pyserial()
    line = servers.rtu({2: ModbusUnit(holding={0: 1})})
    refuse_even_parity(monkeypatch)
    device = ModbusRtuDevice(transport="rtu", machine_id="grinder", machine_type="L", unit_id=2, serial_port=line,
                             parity="E", interval_s=0.1, timeout_s=0.5, backoff_max_s=0.3,
                             registers={"x": Register(address=0)})
    driver, sink = driver_for([device])
    until(lambda: device_status(driver, "grinder")["connect_failures"] >= 3, what="3 attempts to open the port")
    status = device_status(driver, "grinder")
    assert not status["available"] and status["internal_errors"] == 0
    assert status["last_error"] == (f"cannot open {line}: the port refused its settings (Invalid argument): check "
                                    "baudrate, parity and stop bits")
    assert len(log_lines(caplog, "grinder", "unavailable")) == 1
    assert error_lines(caplog) == []  # a setting the port refuses is no bug: said once, counted, tried again
    attempts = status["connect_failures"]
    until(lambda: device_status(driver, "grinder")["connect_failures"] > attempts, what="one more attempt")
    assert sink.readings == []


def test_probe_on_a_serial_port_that_refuses_its_settings_says_so_in_one_line(servers, monkeypatch, capsys):
    needs_pyserial()
    from agent.cli import main

    line = servers.rtu({5: ModbusUnit(holding={0: 1})})
    refuse_even_parity(monkeypatch)
    assert main(["modbus", "probe", "--serial-port", line, "--parity", "E", "--address", "0", "--count", "1"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (f"pdm-edge modbus probe: cannot open {line}: the port refused its settings (Invalid "
                       "argument): check baudrate, parity and stop bits\n")


# --- devices behind one TCP gateway -------------------------------------------------------------------------------

def test_devices_behind_one_tcp_gateway_share_one_connection(servers, driver_for):
    """A serial-to-TCP gateway: one address, a unit id per device, and often only 1-4 connections allowed."""
    units = {uid: ModbusUnit(holding={0: uid * 100}) for uid in (1, 2, 3)}
    port = servers.tcp(units)
    devices = [tcp(f"m{uid}", port, {"x": Register(address=0)}, unit_id=uid) for uid in units]
    driver, sink = driver_for(devices)
    most = 0

    def five_readings_each() -> bool:
        nonlocal most
        most = max(most, servers.connections(port))
        return all(len(sink.of(f"m{uid}")) >= 5 for uid in units)

    until(five_readings_each, what="5 readings from each device")
    assert most == 1
    for uid in units:
        assert {r.fields["x"] for r in sink.of(f"m{uid}")} == {uid * 100}
    status = driver.status()
    assert {d["link"] for d in status["devices"].values()} == {f"{LOCALHOST}:{port}"}
    assert status["available"] == 3


def test_a_silent_unit_behind_a_shared_connection_does_not_stop_the_others(servers, driver_for):
    silent = ModbusUnit(holding={0: 0})
    silent.delay_s = math.inf
    units = {1: ModbusUnit(holding={0: 100}), 2: silent}
    port = servers.tcp(units)
    driver, sink = driver_for([tcp("live", port, {"x": Register(address=0)}, unit_id=1),
                               tcp("dead", port, {"x": Register(address=0)}, unit_id=2, timeout_s=0.1, retries=0)])
    until(lambda: device_status(driver, "dead")["timeouts"] >= 3, what="3 timeouts of the silent unit")
    count = len(sink.of("live"))
    until(lambda: len(sink.of("live")) >= count + 5, what="5 more readings of the live unit")
    assert device_status(driver, "live")["available"] and not device_status(driver, "dead")["available"]


# --- scheduling ---------------------------------------------------------------------------------------------------

def test_polling_goes_on_when_the_wall_clock_steps_back_an_hour(servers):
    """NTP stepping back a clock that ran an hour ahead: the next poll is at the next tick of the new time, not an
    hour later."""
    port = servers.tcp({1: ModbusUnit(holding={0: 1})})
    step = [0.0]
    sink = Recorder()
    driver = ModbusDriver([tcp("m", port, {"x": Register(address=0)})], TYPE_KEY, clock=lambda: time.time() + step[0])
    driver.start(sink)
    try:
        until(lambda: len(sink.of("m")) >= 3, what="3 readings")
        step[0] = -3600.0
        before = len(sink.of("m"))
        until(lambda: len(sink.of("m")) >= before + 3, what="3 readings after the clock stepped back")
    finally:
        driver.close()


@pytest.mark.parametrize("failed, jitter, expected", [
    (1, 0.0, 0.5),   # after one failure: the next tick or so
    (1, 0.999, 0.9995),
    (2, 0.0, 1.0),
    (3, 0.0, 2.0),
    (5, 0.0, 8.0),
    (6, 0.0, 15.0),  # capped at 30 s, jittered over 15..30 s
    (6, 0.999, 29.985),
    (60, 0.5, 22.5),  # forever: no overflow, no giving up
])
def test_backoff_doubles_from_the_interval_up_to_the_cap_with_jitter(failed, jitter, expected):
    assert backoff_s(failed, interval_s=1.0, cap_s=30.0, jitter=jitter) == pytest.approx(expected)


def test_a_blocked_sink_makes_polls_skip_not_pile_up(servers, driver_for):
    port = servers.tcp({1: ModbusUnit(holding={0: 1})})
    sink = Recorder()
    sink.open.clear()  # the pipeline is full
    driver, _ = driver_for([tcp("m", port, {"x": Register(address=0)}, interval_s=0.05)], sink)
    until(lambda: device_status(driver, "m")["skipped_overlaps"] >= 10, what="10 skipped polls")
    assert device_status(driver, "m")["polls"] == 1  # the one waiting on the sink
    sink.open.set()
    until(lambda: len(sink.readings) >= 3, what="readings once the sink takes them")


class Offering(Recorder):
    """A sink that also takes readings without waiting (the pipeline's offer()), refusing them while `full`; put()
    blocks while `open` is clear. Records the thread each reading was taken on."""

    def __init__(self) -> None:
        super().__init__()
        self.full = threading.Event()
        self.threads: list[str] = []

    def offer(self, reading: RawReading) -> bool:
        if self.full.is_set():
            return False
        with self._lock:
            self.readings.append(reading)
            self.threads.append(threading.current_thread().name)
        return True

    def put(self, reading: RawReading) -> None:
        super().put(reading)
        with self._lock:
            self.threads.append(threading.current_thread().name)


def test_a_sink_that_takes_readings_without_waiting_is_offered_them_on_the_event_loop(servers, driver_for):
    port = servers.tcp({1: ModbusUnit(holding={0: 1})})
    sink = Offering()
    driver, _ = driver_for([tcp("m", port, {"x": Register(address=0)}, interval_s=0.02)], sink)
    until(lambda: len(sink.readings) >= 3, what="3 readings")
    assert set(sink.threads) == {"modbus"} and device_status(driver, "m")["readings"] >= 3


def test_a_device_slower_than_its_interval_is_polled_again_at_once_never_stacked_ticks_missed_counted(servers,
                                                                                                        driver_for):
    slow, slower = ModbusUnit(holding={0: 1}), ModbusUnit(holding={0: 2})
    slow.delay_s = 0.25  # every poll spans two more ticks of 0.1 s
    slower.delay_s = 0.25  # a poll overruns its 0.2 s interval by 0.05 s
    devices = [tcp("slow", servers.tcp({1: slow}), {"x": Register(address=0)}, timeout_s=1.0),
               tcp("slower", servers.tcp({1: slower}), {"x": Register(address=0)}, timeout_s=1.0, interval_s=0.2)]
    sink = Offering()  # as the pipeline: a reading is taken at the end of the loop's turn, not by the sink thread
    driver, _ = driver_for(devices, sink)
    until(lambda: min(device_status(driver, m)["readings"] for m in ("slow", "slower")) >= 6, what="6 readings each")
    status = device_status(driver, "slow")
    assert status["skipped_overlaps"] >= status["readings"] - 1  # at least one tick missed per poll, each counted
    assert slow.max_in_flight == 1 and slower.max_in_flight == 1  # never stacked
    assert status["failed_polls"] == 0 and status["available"]
    # Polled again as soon as the last poll ends (0.25 s apart), not at the next free tick of the grid (0.4 s)
    gaps = [b.ts - a.ts for a, b in pairwise(sink.of("slower"))]
    assert statistics.median(gaps) < 0.33, gaps


def test_a_full_offering_sink_gets_the_readings_through_its_blocking_put_and_polls_skip_meanwhile(servers,
                                                                                                 driver_for):
    port = servers.tcp({1: ModbusUnit(holding={0: 1})})
    sink = Offering()
    sink.full.set()
    sink.open.clear()  # full: offer() refuses, put() waits
    driver, _ = driver_for([tcp("m", port, {"x": Register(address=0)}, interval_s=0.05)], sink)
    until(lambda: device_status(driver, "m")["skipped_overlaps"] >= 10, what="10 skipped polls")
    assert device_status(driver, "m")["polls"] == 1 and sink.readings == []
    sink.open.set()
    until(lambda: len(sink.readings) >= 2, what="the waiting reading, put")
    sink.full.clear()
    until(lambda: sink.threads[-1:] == ["modbus"], what="readings offered again once there is room")
    readings = sink.of("m")
    assert [r.ts for r in readings] == sorted(r.ts for r in readings)  # in order, through either path


def test_stop_hands_nothing_more_and_close_is_idempotent(servers):
    port = servers.tcp({1: ModbusUnit(holding={0: 1})})
    never_started = ModbusDriver([tcp("m", port, {"x": Register(address=0)})], TYPE_KEY)
    never_started.stop()
    never_started.close()
    never_started.close()

    sink = Recorder()
    driver = ModbusDriver([tcp("m", port, {"x": Register(address=0)}, interval_s=0.02)], TYPE_KEY)
    driver.start(sink)
    until(lambda: len(sink.readings) >= 3, what="3 readings")
    driver.stop()
    count = len(sink.readings)
    time.sleep(0.1)  # five intervals: nothing more may arrive
    assert len(sink.readings) == count
    driver.stop()
    driver.close()
    driver.close()
    assert not any(t.name in ("modbus", "modbus-sink_0") for t in threading.enumerate())


# --- 50 devices, 5 of them dead -----------------------------------------------------------------------------------

def test_50_devices_with_5_dead_the_live_ones_are_polled_on_time(servers, driver_for, caplog):
    interval, run_s = 0.2, 6.0  # 1,300 polls: a p99 of what one stall of the test process does to all of them
    live_units = {f"m{i:02d}": ModbusUnit(holding={0: i, 1: 0, 2: 0}) for i in range(45)}
    devices = [tcp(name, servers.tcp({1: unit}), {"a": Register(address=0), "b": Register(address=1, type="int32")},
                   interval_s=interval, timeout_s=0.5, retries=1, backoff_max_s=1.0)
               for name, unit in live_units.items()]
    silent = ModbusUnit(holding={0: 0})
    silent.delay_s = math.inf
    dead = {"closed-0": free_port(), "closed-1": free_port(), "closed-2": free_port(),
            "silent-0": servers.tcp({1: silent}), "silent-1": servers.tcp({1: silent})}
    devices += [tcp(name, port, {"a": Register(address=0)}, interval_s=interval, timeout_s=0.5, retries=1,
                    backoff_max_s=1.0) for name, port in dead.items()]
    assert len(devices) == 50

    # The pytest process holds every earlier test's objects: one full garbage collection of that heap stalls all
    # threads for 30-55 ms here, and when it falls on a tick every device is late together. That measures pytest,
    # not the driver, so the heap built so far is frozen out of collection during the run (as the agent should do
    # with its own after start-up: gc.freeze()).
    gc.collect()
    gc.freeze()
    try:
        driver, sink = driver_for(devices)
        started = time.time()
        until(lambda: time.time() > started + run_s + interval, timeout=run_s + 5)
        driver.stop()
    finally:
        gc.unfreeze()

    jitter = []
    for name, unit in live_units.items():
        readings = sink.of(name)
        assert len(readings) >= run_s / interval - 1, (name, len(readings))
        assert {r.fields["a"] for r in readings} == {unit.tables["holding"][0]}
        status = device_status(driver, name)
        jitter += [abs(r.ts - status["phase_s"] - round((r.ts - status["phase_s"]) / interval) * interval)
                   for r in readings]
        assert status["skipped_overlaps"] == 0 and status["failed_polls"] == 0, (name, status)
    p50, p99 = statistics.quantiles(jitter, n=100)[49], statistics.quantiles(jitter, n=100)[98]
    print(f"\npoll time jitter of the 45 live devices over {len(jitter)} polls: p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {max(jitter) * 1000:.1f} ms")
    assert p99 <= 0.050

    for name in dead:
        status = device_status(driver, name)
        assert not status["available"] and status["readings"] == 0, name
        assert len(log_lines(caplog, name, "unavailable")) == 1, name
    assert driver.status()["available"] == 45


# --- the probe ----------------------------------------------------------------------------------------------------

def test_probe_reads_a_device_and_finds_the_display_value(servers):
    torque = Register(address=104, table="input", type="float32", word_order="little")
    unit = ModbusUnit(input={103: 235, **dict(enumerate(encode(41.25, torque), start=104))})
    port = servers.tcp({1: unit})
    rows = probe(host=LOCALHOST, port=port, unit_id=1, address=103, count=3, table="input")
    (row, scale), *_ = matches(rows, 41.25)
    assert (row.address, row.type, row.word_order, row.byte_order, scale) == (104, "float32", "little", "big", 1)
    (row, scale), *_ = matches(rows, 23.5)
    assert (row.address, row.type, scale) == (103, "int16", 0.1)
    assert "<= matches with scale = 0.1" in format_rows(rows, expected=23.5)


@pytest.mark.parametrize("fault, message", [
    ("illegal address", ("unit 1 at 127.0.0.1:{port} answered exception 2 (IllegalAddress) to a read of holding "
                         "registers 10-11: it has no register at some of these addresses")),
    ("closed port", "cannot open 127.0.0.1:{port}: connection refused or unreachable; check the host"),
    ("silent", "unit 1 at 127.0.0.1:{port} did not answer a read of holding registers 10-11 within 0.3 s"),
])
def test_probe_says_why_it_could_not_read(servers, fault, message):
    unit = ModbusUnit(holding={0: 1})
    if fault == "closed port":
        port = free_port()
    else:
        unit.delay_s = math.inf if fault == "silent" else 0
        unit.tables["holding"].update({10: 1, 11: 2} if fault == "silent" else {})
        port = servers.tcp({1: unit})
    with pytest.raises(ProbeError, match="^" + re.escape(message.format(port=port))):
        probe(host=LOCALHOST, port=port, address=10, count=2, timeout_s=0.3)


def test_probe_over_a_serial_line(servers):
    needs_pyserial()
    silent = ModbusUnit(holding={0: 0, 1: 0})
    silent.delay_s = math.inf
    line = servers.rtu({5: ModbusUnit(holding={0: 0x42F6, 1: 0xE979}), 6: silent})
    rows = probe(serial_port=line, parity="N", unit_id=5, address=0, count=2)
    assert any(r.type == "float32" and r.order == "ABCD" and r.value == 123.456 for r in rows)
    with pytest.raises(ProbeError, match="unit 6 .* did not answer .* check the unit id, the baud rate"):
        probe(serial_port=line, parity="N", unit_id=6, address=0, count=2, timeout_s=0.3)


@pytest.mark.parametrize("kwargs, message", [
    ({"address": 0}, "give either host"),
    ({"address": 0, "host": "h", "serial_port": "/dev/x"}, "give either host"),
    ({"address": 0, "host": "h", "count": 126}, "count must be 1..125"),
    ({"address": 65535, "host": "h", "count": 2}, "outside 0..65535"),
    ({"address": 0, "host": "h", "table": "coils"}, "table must be holding or input"),
])
def test_probe_refuses_bad_arguments_before_any_io(kwargs, message):
    with pytest.raises(ValueError, match=message):
        probe(**kwargs)


def test_pdm_edge_modbus_probe_prints_every_decoding_and_marks_the_display_value(servers):
    import subprocess
    import sys

    torque = Register(address=104, table="input", type="float32", word_order="little")
    port = servers.tcp({1: ModbusUnit(input=dict(enumerate(encode(41.25, torque), start=104)))})
    run = subprocess.run([sys.executable, "-m", "agent.cli", "modbus", "probe", "--host", LOCALHOST, "--port",
                          str(port), "--address", "104", "--count", "2", "--table", "input", "--expect", "41.25"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    marked = [line for line in run.stdout.splitlines() if "<= matches" in line]
    assert marked and all("float32" in line for line in marked)
    closed = subprocess.run([sys.executable, "-m", "agent.cli", "modbus", "probe", "--host", LOCALHOST, "--port",
                             str(servers.closer()), "--address", "0", "--timeout", "0.5"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert closed.returncode == 1 and "pdm-edge modbus probe:" in closed.stderr


def test_pdm_edge_modbus_probe_takes_scale_and_offset(servers, capsys):
    from agent.cli import main

    port = servers.tcp({1: ModbusUnit(holding={0: 202})})  # 20.2 °C in tenths
    assert main(["modbus", "probe", "--host", LOCALHOST, "--port", str(port), "--address", "0", "--count", "1",
                 "--scale", "0.1", "--offset", "273.15", "--expect", "293.35"]) == 0
    out = capsys.readouterr().out
    (marked,) = [line for line in out.splitlines() if line.split()[1] == "int16" and "<= matches" in line]
    assert marked.split()[-3:] == ["293.35", "<=", "matches"]

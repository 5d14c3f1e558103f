"""Modbus devices (TCP and RTU): their configuration, one `[[modbus]]` table per device, and the driver that polls
them.

A device is one machine; its register map says where each model input is read and how the registers decode to a
number: value = decoded raw value * scale + offset (drivers/registers.py does the arithmetic).

How the driver runs (who calls what, from which thread):
- The agent calls `start(sink)`, `stop()`, `close()` and `status()` from its own thread.
- `start` runs one asyncio event loop in one thread ("modbus"): one task per device, each polling on an absolute
  grid of `interval_s` (multiples of it since the epoch, so readings of one interval line up across devices). A
  poll still running at the next tick makes that tick skipped and counted, never stacked.
- Each TCP device has its own connection, opened at start (before the first tick) and again whenever it is lost.
  Devices that share a serial port share one link: one request on the line at a time, with the inter-frame pause
  between requests.
- Each poll reads the device's planned requests (contiguous registers merged, see `largest_gap`), decodes them
  and hands one RawReading to the sink from a single "modbus-sink" thread: `sink.put()` may block (back-pressure),
  the event loop never does. A blocked sink makes polls overlap, so they are skipped and counted.
- A device that stops answering is retried with exponential backoff and jitter, capped at `backoff_max_s`,
  forever; it is logged once when it goes down and once when it is back. A dead or slow device delays no other
  device (except on a shared serial line, where the bus itself is shared).

Errors at the link (all `ModbusLinkError`, raised by `Link.read`, mapped from pymodbus and asyncio at the boundary):

    ModbusLinkError
    ├── ConnectFailed       the connection or the serial port could not be opened
    ├── RequestTimeout      no answer within timeout_s
    ├── ConnectionLost      the device closed the connection during the request (or sent garbage)
    └── DeviceException     the device answered with a Modbus exception response (`code`, `code_name`)

`ModbusSetupError` (a ValueError) is raised by `ModbusDriver(...)` for what keeps the driver from running at all:
devices on one serial port with different line settings, or RTU without pyserial installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from drivers.base import Availability, MachineId, MachineType, RawReading, Sink
from drivers.registers import MAX_READ_REGISTERS, REGISTER_WORDS, ReadRequest, decode_response, plan_reads

log = logging.getLogger(__name__)

RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32", "float64"]
TRANSPORTS = ("tcp", "rtu")


class Register(BaseModel):
    """Where one model input is read: `[modbus.registers.<input name>]`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a scale of NaN turns every reading into NaN

    address: int = Field(ge=0, le=65535)
    table: Literal["holding", "input"] = "holding"
    type: RegisterType = "uint16"
    word_order: Literal["big", "little"] = "big"  # for multi-register types: which register holds the high word
    byte_order: Literal["big", "little"] = "big"  # within each register
    scale: float = 1.0
    offset: float = 0.0

    @field_validator("type")
    @classmethod
    def _fits_register_space(cls, value: str, info: ValidationInfo) -> str:
        address = info.data.get("address")
        if address is not None and address + REGISTER_WORDS[value] > 65536:
            raise ValueError(f"{value} at address {address} runs past register 65535; check the address")
        return value

    @field_validator("scale")
    @classmethod
    def _nonzero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("a scale of 0 turns every reading into the offset; use 1 for no scaling")
        return value


class _Device(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # interval_s = inf would stop polling

    machine_id: MachineId
    machine_type: MachineType
    unit_id: int = Field(1, ge=0, le=255)
    interval_s: float = Field(1.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)
    retries: int = Field(2, ge=0)
    # Unread registers a request may span to merge two reads into one. 0 merges only adjacent registers: some
    # devices answer "illegal address" to a request that covers a register they do not have.
    largest_gap: int = Field(0, ge=0, le=MAX_READ_REGISTERS - 2)
    backoff_max_s: float = Field(30.0, gt=0)  # longest wait between attempts to reach a device that stopped answering
    registers: dict[str, Register] = Field(min_length=1)  # model input name -> register


class ModbusTcpDevice(_Device):
    transport: Literal["tcp"]
    host: str = Field(min_length=1)
    port: int = Field(502, ge=1, le=65535)


class ModbusRtuDevice(_Device):
    """A device on a serial line; the defaults are the Modbus serial line standard's (19200 baud, 8E1)."""

    transport: Literal["rtu"]
    serial_port: str = Field(min_length=1)
    baudrate: int = Field(19200, gt=0)
    parity: Literal["N", "E", "O"] = "E"
    stopbits: int = Field(1, ge=1, le=2)
    # Silence on the line between a response and the next request. Default: the standard's 3.5 character times
    # (2 ms at 19200 baud, 1.75 ms above); raise it for slow devices or RS-485 adapters that turn around late.
    frame_pause_ms: float | None = Field(None, ge=0, le=10_000)

    @field_validator("unit_id")
    @classmethod
    def _addressable(cls, value: int) -> int:
        if not 1 <= value <= 247:
            raise ValueError("a device on a serial line has a unit id 1..247 (0 is broadcast: nobody answers a read)")
        return value


ModbusDevice = Annotated[ModbusTcpDevice | ModbusRtuDevice, Field(discriminator="transport")]

_LINE_KEYS = ("baudrate", "parity", "stopbits")


def check_lines(devices: Sequence[ModbusTcpDevice | ModbusRtuDevice]) -> list[str]:
    """Problems across devices: those on one serial port must agree on its settings. Each names the keys."""
    problems = []
    first: dict[str, int] = {}
    for index, device in enumerate(devices):
        if not isinstance(device, ModbusRtuDevice):
            continue
        if device.serial_port not in first:
            first[device.serial_port] = index
            continue
        other = devices[first[device.serial_port]]
        for key in _LINE_KEYS:
            if getattr(device, key) != getattr(other, key):
                problems.append(
                    f"modbus[{index}].{key} = {getattr(device, key)!r} differs from modbus[{first[device.serial_port]}]"
                    f".{key} = {getattr(other, key)!r} on {device.serial_port}: devices on one serial line share its "
                    f"settings; set the same {key} on both")
    return problems


def frame_pause_s(baudrate: int) -> float:
    """The Modbus RTU inter-frame silence: 3.5 characters of 11 bits, 1.75 ms above 19200 baud."""
    return 3.5 * 11 / baudrate if baudrate <= 19200 else 0.00175


# --- the link: one connection, one request at a time ------------------------------------------------------------

EXCEPTION_NAMES = {
    1: "IllegalFunction", 2: "IllegalAddress", 3: "IllegalValue", 4: "DeviceFailure", 5: "Acknowledge",
    6: "DeviceBusy", 7: "NegativeAcknowledge", 8: "MemoryParityError", 10: "GatewayPathUnavailable",
    11: "GatewayTargetNoResponse",
}
_EXCEPTION_HINTS = {
    1: "the device does not read this table with this function; try the other table (holding / input)",
    2: "the device has no register at some address of the request: check address, table and type "
       "(a request merged over a gap also covers the unmapped registers in between: lower largest_gap)",
    3: "the device refused the request's size: check the type and lower largest_gap",
    4: "the device reported an internal failure",
}
RETRYABLE_EXCEPTIONS = {5, 6}  # the device is busy: the same request may succeed a moment later
GATEWAY_EXCEPTIONS = {10, 11}  # a gateway answered for the device: the device itself is not answering


class ModbusLinkError(Exception):
    """A request on a link failed; the subclass says how."""


class ConnectFailed(ModbusLinkError):
    pass


class RequestTimeout(ModbusLinkError):
    pass


class ConnectionLost(ModbusLinkError):
    pass


class DeviceException(ModbusLinkError):
    def __init__(self, code: int) -> None:
        self.code = code
        self.code_name = EXCEPTION_NAMES.get(code, f"Code{code}")
        super().__init__(f"exception {code} ({self.code_name})")

    @property
    def key(self) -> str:
        """The name as a status key: illegal_address, device_busy, code_12."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", self.code_name).lower()

    @property
    def hint(self) -> str:
        return _EXCEPTION_HINTS.get(self.code, "")


class ModbusSetupError(ValueError):
    """The driver cannot run with this configuration on this machine."""


def quiet_library() -> None:
    # pymodbus logs every failed connect and every lost frame at WARNING/ERROR. We log state changes and count the
    # rest, so its own lines would repeat ours once per attempt. An operator who set its level keeps it.
    library = logging.getLogger("pymodbus")
    if library.level == logging.NOTSET:
        library.setLevel(logging.CRITICAL)


class Link:
    """One Modbus connection: a TCP device's own, or a serial line shared by the devices on it.

    `read()` runs on the event loop that created the link. Requests never overlap (an asyncio.Lock) and a serial
    line stays silent for `pause_s` between a response and the next request. The connection is opened on the first
    request and after it is lost; pymodbus's own retries and reconnection are off: each caller decides.
    """

    def __init__(self, name: str, make_client: Callable[[Callable[[bool], None]], Any], *, serial: bool,
                 pause_s: float = 0.0) -> None:
        self.name = name  # e.g. "10.0.0.5:502" or "/dev/ttyUSB0"
        self.serial = serial
        self.pause_s = pause_s
        self._make_client = make_client  # (trace_connect callback) -> an unconnected pymodbus async client
        self._client = None
        self._lost: asyncio.Future | None = None  # resolved when the open connection is lost
        self._lock = asyncio.Lock()
        self._quiet_until = 0.0

    @classmethod
    def tcp(cls, host: str, port: int, max_timeout_s: float) -> Link:
        from pymodbus.client import AsyncModbusTcpClient

        return cls(f"{host}:{port}", lambda trace: AsyncModbusTcpClient(
            host, port=port, timeout=max_timeout_s + 1, retries=0, reconnect_delay=0, trace_connect=trace,
            name=f"{host}:{port}"), serial=False)

    @classmethod
    def rtu(cls, serial_port: str, baudrate: int, parity: str, stopbits: int, max_timeout_s: float,
            pause_s: float | None = None) -> Link:
        if importlib.util.find_spec("serial") is None:
            raise ModbusSetupError(f"Modbus RTU on {serial_port} needs pyserial: pip install 'pymodbus[serial]'")
        from pymodbus.client import AsyncModbusSerialClient

        return cls(serial_port, lambda trace: AsyncModbusSerialClient(
            serial_port, baudrate=baudrate, parity=parity, stopbits=stopbits, bytesize=8, timeout=max_timeout_s + 1,
            retries=0, reconnect_delay=0, trace_connect=trace, name=serial_port),
            serial=True, pause_s=frame_pause_s(baudrate) if pause_s is None else pause_s)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def open(self, timeout: float) -> None:
        """Connect now rather than at the first request, so that the first poll is on time; a failure is left for
        that request to meet and report."""
        async with self._lock:
            try:
                await self._connected(timeout)
            except ModbusLinkError:
                pass

    async def read(self, table: str, address: int, count: int, unit_id: int, timeout: float) -> list[int]:
        """`count` registers of `table` from `address`. Raises a ModbusLinkError."""
        return (await self.read_timed(table, address, count, unit_id, timeout))[0]

    async def read_timed(self, table: str, address: int, count: int, unit_id: int,
                         timeout: float) -> tuple[list[int], float]:
        """read(), and the loop time at which the request was sent (after waiting for the line and connecting)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            delay = self._quiet_until - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                response, sent = await self._request(table, address, count, unit_id, timeout)
            finally:
                self._quiet_until = loop.time() + self.pause_s
        if response.isError():
            raise DeviceException(int(getattr(response, "exception_code", 0)))
        registers = list(response.registers)
        if len(registers) < count:
            raise ConnectionLost(f"the device sent {len(registers)} registers instead of {count}")
        return registers[:count], sent

    async def _request(self, table: str, address: int, count: int, unit_id: int, timeout: float):
        client = await self._connected(timeout)
        method = client.read_holding_registers if table == "holding" else client.read_input_registers
        sent = asyncio.get_running_loop().time()
        call = asyncio.ensure_future(method(address, count=count, device_id=unit_id))
        lost = self._lost
        try:
            done, _ = await asyncio.wait((call, lost), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the poll was cancelled (the driver stops)
            call.cancel()
            raise
        if call in done:
            try:
                return call.result(), sent
            except Exception as exc:  # pymodbus: not connected, wrong transaction id, a frame it cannot parse
                self.close()
                raise ConnectionLost(f"bad response: {exc}") from exc
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # we are being cancelled too, not only the call
                raise
        except Exception:  # noqa: BLE001, S110 - the request is abandoned; why it ended does not matter
            pass
        if lost in done:
            self.close()
            raise ConnectionLost("the connection was closed during the request")
        if not self.serial:
            # A late answer on this connection could be taken for the next request's; and a device that rebooted
            # leaves a connection that never answers again. A fresh connection clears both.
            self.close()
        raise RequestTimeout(f"no answer within {timeout:g} s")

    async def _connected(self, timeout: float):
        if self.connected:
            return self._client
        self.close()
        loop = asyncio.get_running_loop()
        lost = loop.create_future()

        def trace(connected: bool) -> None:
            if not connected and not lost.done():
                lost.set_result(None)

        client = self._make_client(trace)
        try:
            ok = await asyncio.wait_for(client.connect(), timeout)
        except TimeoutError:
            ok, why = False, f"no answer to the connection within {timeout:g} s"
        else:
            why = "no such serial port, or it is in use or not permitted" if self.serial \
                else "connection refused or unreachable"
        if not ok:
            client.close()
            raise ConnectFailed(f"cannot open {self.name}: {why}")
        self._client, self._lost = client, lost
        return client

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


# --- the driver -----------------------------------------------------------------------------------------------------

class _Poller:
    """One device's schedule, counters and state. Lives on the driver's event loop."""

    def __init__(self, config: ModbusTcpDevice | ModbusRtuDevice, link: Link) -> None:
        self.config = config
        self.link = link
        self.plan: list[ReadRequest] = plan_reads(config.registers, config.largest_gap)
        self.availability = Availability(f"Modbus device {config.machine_id} ({link.name} unit {config.unit_id})",
                                         log)
        self.schedule: asyncio.Task | None = None
        self.poll: asyncio.Task | None = None
        self.retry_at = 0.0  # loop time before which a device that stopped answering is not tried
        self.failed_in_a_row = 0
        self.logged: set[tuple[int, int]] = set()  # (request index, exception code) logged, until that request works
        self.polls = self.readings = self.failed_polls = self.skipped_overlaps = 0
        self.requests = self.retries = self.timeouts = self.connection_losses = self.connect_failures = 0
        self.exceptions: dict[str, int] = {}
        self.last_reading_ts: float | None = None
        self.last_poll_s: float | None = None

    def status(self, now: float) -> dict[str, Any]:
        config = self.config
        return {
            "transport": config.transport, "link": self.link.name, "unit_id": config.unit_id,
            "interval_s": config.interval_s, "available": self.availability.up, "connected": self.link.connected,
            "polls": self.polls, "readings": self.readings, "failed_polls": self.failed_polls,
            "skipped_overlaps": self.skipped_overlaps, "requests_per_poll": len(self.plan), "requests": self.requests,
            "retries": self.retries, "timeouts": self.timeouts, "connection_losses": self.connection_losses,
            "connect_failures": self.connect_failures, "exceptions": dict(self.exceptions),
            "retry_in_s": round(max(0.0, self.retry_at - now), 3), "last_reading_ts": self.last_reading_ts,
            "last_poll_ms": None if self.last_poll_s is None else round(self.last_poll_s * 1000, 1),
            "last_error": self.availability.last_error,
        }


def backoff_s(failed_in_a_row: int, interval_s: float, cap_s: float, jitter: float) -> float:
    """How long a device that failed `failed_in_a_row` polls waits before the next attempt: from half an interval
    after the first failure, doubling, never more than `cap_s`. `jitter` in [0, 1) spreads it over [delay / 2,
    delay), so devices that failed together (a switch rebooted) are not all retried in the same instant."""
    delay = min(cap_s, interval_s * 2 ** (failed_in_a_row - 1))
    return delay * (0.5 + jitter / 2)


class _DeviceDown(Exception):
    """The device did not answer a request, after the retries: the poll failed and the device backs off."""


class ModbusDriver:
    """Polls Modbus TCP and RTU devices; see the module docstring for threads, schedule and failure handling."""

    name = "modbus"

    def __init__(self, devices: Sequence[ModbusTcpDevice | ModbusRtuDevice], type_key: str,
                 clock: Callable[[], float] = time.time) -> None:
        """Raises ModbusSetupError when the devices cannot be polled as configured (no I/O happens here)."""
        problems = check_lines(devices)
        if problems:
            raise ModbusSetupError("; ".join(problems))
        if any(isinstance(d, ModbusRtuDevice) for d in devices) and importlib.util.find_spec("serial") is None:
            raise ModbusSetupError("Modbus RTU needs pyserial, which is not installed: pip install 'pymodbus[serial]'")
        self.devices = list(devices)
        self._type_key = type_key
        self._clock = clock
        self._sink: Sink | None = None
        self._stopped = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._sink_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._pollers: list[_Poller] = []
        self._links: list[Link] = []

    # --- called by the agent ---
    def start(self, sink: Sink) -> None:
        if self._thread is not None:
            raise RuntimeError("the Modbus driver is already started")
        quiet_library()
        self._sink, self._stopped, self._pollers, self._links = sink, False, [], []
        self._sink_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="modbus-sink")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="modbus", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._begin(), self._loop).result()
        log.info("polling %d Modbus device(s) over %d link(s)", len(self._pollers), len(self._links))

    def stop(self) -> None:
        """Poll no more and hand nothing more to the sink; connections stay open until close()."""
        self._stopped = True
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._cancel(), self._loop).result()
        if self._sink_thread is not None:
            # The sink thread runs one put at a time: once this no-op ran, a put in progress has returned and any
            # later one sees _stopped.
            self._sink_thread.submit(lambda: None).result()

    def close(self) -> None:
        self.stop()
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(self._close_links(), loop).result()
                loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join()
            loop.close()
        if self._sink_thread is not None:
            self._sink_thread.shutdown(wait=True)
            self._sink_thread = None

    def status(self) -> dict[str, Any]:
        now = self._loop.time() if self._loop is not None else time.monotonic()
        pollers = list(self._pollers)
        return {"driver": self.name, "devices": {p.config.machine_id: p.status(now) for p in pollers},
                "available": sum(p.availability.up for p in pollers), "total": len(pollers)}

    # --- on the event loop ---
    async def _begin(self) -> None:
        links: dict[tuple, Link] = {}
        for device in self.devices:
            if isinstance(device, ModbusRtuDevice):
                key = ("rtu", device.serial_port)
                if key not in links:
                    line = [d for d in self.devices if isinstance(d, ModbusRtuDevice)
                            and d.serial_port == device.serial_port]
                    pauses = [d.frame_pause_ms / 1000 for d in line if d.frame_pause_ms is not None]
                    links[key] = Link.rtu(device.serial_port, device.baudrate, device.parity, device.stopbits,
                                          max(d.timeout_s for d in line), max(pauses) if pauses else None)
            else:
                key = ("tcp", device.machine_id)  # a connection per device: no device waits for another's answer
                links[key] = Link.tcp(device.host, device.port, device.timeout_s)
            poller = _Poller(device, links[key])
            self._pollers.append(poller)
            poller.schedule = asyncio.create_task(self._schedule(poller), name=f"modbus {device.machine_id}")
        self._links = list(links.values())

    async def _cancel(self) -> None:
        tasks = [t for p in self._pollers for t in (p.schedule, p.poll) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_links(self) -> None:
        for link in self._links:
            link.close()

    async def _schedule(self, poller: _Poller) -> None:
        """Start a poll at every multiple of interval_s (wall clock); skip a tick while the last poll runs or while
        the device backs off. Follows wall clock steps (NTP at boot) instead of drifting off the grid."""
        loop = asyncio.get_running_loop()
        interval = poller.config.interval_s
        await poller.link.open(poller.config.timeout_s)
        last = None
        while True:
            now = time.time()
            tick = math.floor(now / interval) + 1
            if tick == last:  # woke a hair before the tick just handled
                tick += 1
            await asyncio.sleep(tick * interval - now)
            last = tick
            if poller.poll is not None and not poller.poll.done():
                poller.skipped_overlaps += 1
            elif loop.time() >= poller.retry_at:
                poller.poll = loop.create_task(self._poll(poller))

    async def _poll(self, poller: _Poller) -> None:
        config = poller.config
        loop = asyncio.get_running_loop()
        started = loop.time()
        poller.polls += 1
        values: dict[str, Any] = {}
        ts = None
        try:
            for index, request in enumerate(poller.plan):
                words, sent = await self._read(poller, index, request)
                ts = sent if ts is None else ts
                values.update(decode_response(request, words, config.registers))
        except _DeviceDown as exc:
            self._failed(poller, str(exc))
            return
        except DeviceException:
            poller.failed_polls += 1
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: keep polling, but say it
            log.exception("Modbus device %s: poll failed", config.machine_id)
            self._failed(poller, f"internal error: {exc!r}")
            return
        finally:
            poller.last_poll_s = loop.time() - started
        poller.availability.succeeded()
        poller.failed_in_a_row, poller.retry_at = 0, 0.0
        fields = {**values, self._type_key: config.machine_type}
        reading = RawReading(config.machine_id, ts, fields, f"modbus:{config.machine_id}", self._clock(),
                             json.dumps(fields))
        if await loop.run_in_executor(self._sink_thread, self._hand, reading):
            poller.readings += 1
            poller.last_reading_ts = ts

    async def _read(self, poller: _Poller, index: int, request: ReadRequest) -> tuple[list[int], float]:
        """One planned request, retried `retries` times on a timeout, a lost connection, a busy device or a gateway
        whose device did not answer. Returns the words and when the request that got them was sent (clock time)."""
        config = poller.config
        loop = asyncio.get_running_loop()
        attempts = config.retries + 1
        for attempt in range(attempts):
            if attempt:
                poller.retries += 1
            poller.requests += 1
            try:
                words, sent = await poller.link.read_timed(request.table, request.address, request.count,
                                                           config.unit_id, config.timeout_s)
            except ConnectFailed as exc:
                poller.connect_failures += 1
                raise _DeviceDown(str(exc)) from None  # refused now, refused a millisecond later: no retry
            except RequestTimeout as exc:
                poller.timeouts += 1
                error = f"{request.describe()}: {exc}"
            except ConnectionLost as exc:
                poller.connection_losses += 1
                error = f"{request.describe()}: {exc}"
            except DeviceException as exc:
                poller.exceptions[exc.key] = poller.exceptions.get(exc.key, 0) + 1
                error = f"{request.describe()}: {exc}"
                if exc.code in GATEWAY_EXCEPTIONS:  # the gateway answered for a device that did not
                    continue
                if exc.code in RETRYABLE_EXCEPTIONS and attempt + 1 < attempts:
                    continue
                self._refused(poller, index, request, exc)
                raise
            else:
                if poller.logged:
                    poller.logged = {key for key in poller.logged if key[0] != index}
                return words, self._clock() - (loop.time() - sent)
        raise _DeviceDown(error)

    def _refused(self, poller: _Poller, index: int, request: ReadRequest, exc: DeviceException) -> None:
        """The device answered with an exception: its link works, this request does not. Logged once per request
        and code (again only after the request has read well), counted always."""
        config = poller.config
        poller.availability.succeeded()
        if (index, exc.code) in poller.logged:
            return
        poller.logged.add((index, exc.code))
        log.warning("Modbus device %s (%s unit %d) answered %s to a read of %s: %s. Counted from now on; logged "
                    "again only after this read works", config.machine_id, poller.link.name, config.unit_id, exc,
                    request.describe(), exc.hint or "see the device's manual",
                    extra={"connection": poller.availability.name})

    def _failed(self, poller: _Poller, error: str) -> None:
        poller.failed_polls += 1
        poller.failed_in_a_row += 1
        poller.availability.failed(error)
        config = poller.config
        delay = backoff_s(poller.failed_in_a_row, config.interval_s, config.backoff_max_s, random.random())
        poller.retry_at = asyncio.get_running_loop().time() + delay  # the ticks before it are not polled

    # --- on the sink thread ---
    def _hand(self, reading: RawReading) -> bool:
        if self._stopped:
            return False
        self._sink.put(reading)
        return True

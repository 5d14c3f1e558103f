"""Modbus devices (TCP and RTU): their configuration, one `[[modbus]]` table per device, and the driver that polls
them.

A device is one machine; its register map says where each model input is read and how the registers decode to a
number: value = decoded raw value * scale + offset (drivers/registers.py does the arithmetic).

How the driver runs (who calls what, from which thread):
- The agent calls `start(sink)`, `stop()`, `close()` and `stats()` from its own thread.
- `start` runs one asyncio event loop in one thread ("modbus"): one task per device, each polling on its own absolute
  grid of `interval_s`: multiples of it since the epoch plus the device's phase (`grid_phases`), which spreads the
  devices that share an interval over it, so that 200 devices at 1 s do not put 200 requests on the network (or
  one serial line) in the same instant, nor on one server that answers them in turn. The task sleeps until its next
  due tick (the next one after the poll, and after the backoff of a device that stopped answering), never waking on
  ticks it will not poll. A poll that overran the next tick is followed by the next one at once: a device slower
  than its interval is polled as fast as it answers, one poll at a time; the ticks passed are counted as skipped.
- Devices that share a TCP host and port share one connection, and devices that share a serial port share one
  line (drivers/modbus_link.py): one request on it at a time (on a serial line with the inter-frame pause between
  requests). A Modbus TCP gateway in front of serial devices (one address, a unit id per device) often accepts only
  1-4 connections. A connection is opened at start (before the first tick) and again whenever it is lost.
- Each poll reads the device's planned requests (contiguous registers merged, see `largest_gap`), decodes them
  (decoders compiled once per request, drivers/registers.py `ResponseDecoder`) and queues one RawReading for the
  sink. At the end of each turn of the event loop the readings of the polls that ended in it are handed over: a
  sink that takes readings without waiting (`OfferingSink.offer`, the pipeline) is offered them on the loop; what it
  refuses (it is full), or all of them for a sink without `offer`, go to a single "modbus-sink" thread as one batch
  (one hand-off between threads per batch, not per reading), which calls `sink.put()` for each: put may block
  (back-pressure), the event loop never does. A device whose last reading the sink has not taken yet skips its
  ticks (counted) rather than polling again: at most one reading per device waits, so a blocked sink stops the
  polls and memory stays bounded.
- A device is up while its polls yield readings. One that stops answering is down at once and retried with
  exponential backoff and jitter, capped at `backoff_max_s`, forever; one that answers but yields no reading
  (Modbus exception responses, words that do not decode) is down after DOWN_AFTER_POLLS such polls in a row and
  polled on. Either is logged once when it goes down and once when it is back. A dead or slow device delays no
  other device, except those sharing its serial line or TCP connection.
- Nothing ends unseen: each device's task is supervised. Anything unexpected raised in it (a bug, a library
  raising what it should not) is logged with its traceback once, counted (`internal_errors`), shows the device
  down, and the device is retried with the same backoff; a task that ends anyway is logged and started again.

`ModbusSetupError` (a ValueError) is raised by `ModbusDriver(...)` for what keeps the driver from running at all:
devices on one serial port with different line settings, or RTU without pyserial installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from drivers.base import (
    Availability,
    DeviceStats,
    DriverStats,
    MachineId,
    MachineType,
    OfferingSink,
    RawReading,
    Scale,
    Sink,
)
from drivers.loop_thread import LoopThread
from drivers.modbus_link import (  # noqa: F401 - Link's names are this module's too (probe, bench)
    GATEWAY_EXCEPTIONS,
    RETRYABLE_EXCEPTIONS,
    ConnectFailed,
    ConnectionLost,
    DeviceException,
    Link,
    ModbusLinkError,
    ModbusSetupError,
    RequestTimeout,
    frame_pause_s,
    quiet_library,
)
from drivers.registers import MAX_READ_REGISTERS, REGISTER_WORDS, ReadRequest, ResponseDecoder, plan_reads

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
    scale: Scale = 1.0
    offset: float = 0.0

    @field_validator("type")
    @classmethod
    def _fits_register_space(cls, value: str, info: ValidationInfo) -> str:
        address = info.data.get("address")
        if address is not None and address + REGISTER_WORDS[value] > 65536:
            raise ValueError(f"{value} at address {address} runs past register 65535; check the address")
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


GRID_SLOTS = 20  # phases per interval at most


def grid_phases(devices: Sequence[_Device]) -> list[float]:
    """Each device's offset on its interval's grid, in seconds. The n devices that poll at one interval_s take m =
    min(n, GRID_SLOTS) slots spread evenly over it, in turn in configuration order: device i polls at k * interval_s
    + (i mod m) * interval_s / m, so devices listed together (one serial line, one gateway) fall in different slots.
    Evenly, unlike a hash of the machine id, whose collisions would bunch devices up again. At most GRID_SLOTS: ten
    requests at once are no burst for a network or a server, and each slot costs the event loop a wake-up of its
    own (about 80 µs of CPU on a virtual machine), where the devices of one slot share it."""
    of_interval = Counter(device.interval_s for device in devices)
    seen: Counter[float] = Counter()
    phases = []
    for device in devices:
        slots = min(of_interval[device.interval_s], GRID_SLOTS)
        phases.append(device.interval_s * (seen[device.interval_s] % slots) / slots)
        seen[device.interval_s] += 1
    return phases


# --- the driver -----------------------------------------------------------------------------------------------------

DOWN_AFTER_POLLS = 3  # polls in a row that yield no reading although the device answers: then it is down


class _Poller:
    """One device's schedule, counters and state. Lives on the driver's event loop."""

    def __init__(self, config: ModbusTcpDevice | ModbusRtuDevice, link: Link, phase_s: float = 0.0) -> None:
        self.config = config
        self.link = link
        self.phase_s = phase_s  # its ticks are at k * interval_s + phase_s (epoch seconds)
        self.plan: list[ReadRequest] = plan_reads(config.registers, config.largest_gap)
        self.decoders = [ResponseDecoder(request, config.registers) for request in self.plan]
        self.source = f"modbus:{config.machine_id}"
        self.availability = Availability(f"Modbus device {config.machine_id} ({link.name} unit {config.unit_id})",
                                         log)
        self.schedule: asyncio.Task[None] | None = None
        # Its last reading waits for the sink: set on the event loop, cleared by the sink thread once put.
        self.handing = False
        self.retry_at = 0.0  # loop time before which a device that stopped answering is not tried
        self.failed_in_a_row = 0  # polls the device did not answer
        self.empty_in_a_row = 0  # polls that yielded no reading although the device answered
        self.logged: set[tuple[int, int]] = set()  # (request index, exception code) logged, until that request works
        self.unexpected_logged = False  # an unexpected error's traceback was logged, until the next reading
        self.polls = self.readings = self.failed_polls = self.skipped_overlaps = 0
        self.requests = self.retries = self.timeouts = self.connection_losses = self.connect_failures = 0
        self.internal_errors = 0
        self.exceptions: dict[str, int] = {}
        self.last_reading_ts: float | None = None
        self.last_poll_s: float | None = None

    def status(self, now: float) -> dict[str, Any]:
        config = self.config
        return {
            "transport": config.transport, "link": self.link.name, "unit_id": config.unit_id,
            "interval_s": config.interval_s, "phase_s": self.phase_s, "available": self.availability.up, "connected": self.link.connected,
            "polls": self.polls, "readings": self.readings, "failed_polls": self.failed_polls,
            "skipped_overlaps": self.skipped_overlaps, "requests_per_poll": len(self.plan), "requests": self.requests,
            "retries": self.retries, "timeouts": self.timeouts, "connection_losses": self.connection_losses,
            "connect_failures": self.connect_failures, "internal_errors": self.internal_errors,
            "exceptions": dict(self.exceptions), "retry_in_s": round(max(0.0, self.retry_at - now), 3),
            "last_reading_ts": self.last_reading_ts,
            "last_poll_ms": None if self.last_poll_s is None else round(self.last_poll_s * 1000, 1),
            "last_error": self.availability.last_error,
        }

    def stats(self) -> DeviceStats:
        return DeviceStats(
            device=self.config.machine_id, connected=self.availability.up,
            errors={"failed_polls": self.failed_polls, "timeouts": self.timeouts,
                    "connection_losses": self.connection_losses, "connect_failures": self.connect_failures,
                    "internal_errors": self.internal_errors},
            last_error=self.availability.last_error, polls=self.polls, skipped_polls=self.skipped_overlaps)


def backoff_s(failed_in_a_row: int, interval_s: float, cap_s: float, jitter: float) -> float:
    """How long a device that failed `failed_in_a_row` polls waits before the next attempt: from half an interval
    after the first failure, doubling, never more than `cap_s`. `jitter` in [0, 1) spreads it over [delay / 2,
    delay), so devices that failed together (a switch rebooted) are not all retried in the same instant."""
    delay = min(cap_s, interval_s * 2.0 ** (failed_in_a_row - 1))
    return delay * (0.5 + jitter / 2)


class _DeviceDown(Exception):
    """The device did not answer a request, after the retries: the poll failed and the device backs off."""


class _NoReading(Exception):
    """The device answered, but the poll yields no reading (an exception response, words that do not decode)."""


class ModbusDriver:
    """Polls Modbus TCP and RTU devices; see the module docstring for threads, schedule and failure handling."""

    name = "modbus"

    def __init__(self, devices: Sequence[ModbusTcpDevice | ModbusRtuDevice], type_key: str,
                 clock: Callable[[], float] = time.time) -> None:
        """`clock`: wall time, for the polls' grid and the readings' times. Raises ModbusSetupError when the devices
        cannot be polled as configured (no I/O happens here)."""
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
        self._threads = LoopThread("modbus")
        self._outgoing: list[tuple[_Poller, RawReading]] = []  # for the sink, at the end of this loop turn
        # Batches handed to the sink thread (written on the loop) and put (written by the sink thread).
        self._submitted = self._put = 0
        self._offer: Callable[[RawReading], bool] | None = None
        self._pollers: list[_Poller] = []
        self._links: list[Link] = []

    # --- called by the agent ---
    def start(self, sink: Sink) -> None:
        if self._threads.started:
            raise RuntimeError("the Modbus driver is already started")
        quiet_library()
        self._sink, self._stopped, self._pollers, self._links, self._outgoing = sink, False, [], [], []
        self._submitted = self._put = 0
        self._offer = sink.offer if isinstance(sink, OfferingSink) else None
        self._threads.start()
        self._threads.run(self._begin())
        log.info("polling %d Modbus device(s) over %d link(s)", len(self._pollers), len(self._links))

    def stop(self) -> None:
        """Poll no more and hand nothing more to the sink; connections stay open until close()."""
        self._stopped = True
        if self._threads.running():
            self._threads.run(self._cancel())
        self._threads.drain_sink()  # a later put sees _stopped

    def close(self) -> None:
        self.stop()
        self._threads.close(self._close_links)

    def status(self) -> dict[str, Any]:
        """Everything the driver counts, for people and tests: `stats()` is what the agent reads."""
        now = self._threads.time()
        pollers = list(self._pollers)
        return {"driver": self.name, "devices": {p.config.machine_id: p.status(now) for p in pollers},
                "available": sum(p.availability.up for p in pollers), "total": len(pollers)}

    def stats(self) -> DriverStats:
        return DriverStats.of_devices(self.name, tuple(p.stats() for p in list(self._pollers)), self.status())

    # --- on the event loop ---
    async def _begin(self) -> None:
        links: dict[tuple[str | int, ...], Link] = {}
        for device, phase in zip(self.devices, grid_phases(self.devices), strict=True):
            if isinstance(device, ModbusRtuDevice):
                key: tuple[str | int, ...] = ("rtu", device.serial_port)
                if key not in links:
                    line = [d for d in self.devices if isinstance(d, ModbusRtuDevice)
                            and d.serial_port == device.serial_port]
                    pauses = [d.frame_pause_ms / 1000 for d in line if d.frame_pause_ms is not None]
                    links[key] = Link.rtu(device.serial_port, device.baudrate, device.parity, device.stopbits,
                                          max(d.timeout_s for d in line), max(pauses) if pauses else None)
            else:
                key = ("tcp", device.host, device.port)  # one connection per host and port: gateways limit them
                if key not in links:
                    timeout = max(d.timeout_s for d in self.devices if isinstance(d, ModbusTcpDevice)
                                  and (d.host, d.port) == key[1:])
                    links[key] = Link.tcp(device.host, device.port, timeout)
            poller = _Poller(device, links[key], phase)
            self._pollers.append(poller)
            self._supervise(poller)
        self._links = list(links.values())

    def _supervise(self, poller: _Poller) -> None:
        """Start the device's task, watched: if it ends while the driver runs, that is said and it starts again."""
        poller.schedule = asyncio.get_running_loop().create_task(self._run(poller),
                                                                 name=f"modbus {poller.config.machine_id}")
        poller.schedule.add_done_callback(lambda task: self._ended(poller, task))

    def _ended(self, poller: _Poller, task: asyncio.Task[None]) -> None:
        if self._stopped:
            return
        why = "it was cancelled" if task.cancelled() else f"{task.exception()!r}" if task.exception() else "no error"
        self._unexpected(poller, RuntimeError(f"the device's task ended ({why}); started again"))
        self._supervise(poller)

    async def _run(self, poller: _Poller) -> None:
        """The device's schedule, restarted after the backoff whenever something unexpected ends it."""
        loop = asyncio.get_running_loop()
        while not self._stopped:
            await asyncio.sleep(max(0.0, poller.retry_at - loop.time()))
            try:
                await self._schedule(poller)
            except Exception as exc:  # noqa: BLE001 - said, counted and retried: see _unexpected
                self._unexpected(poller, exc)

    async def _cancel(self) -> None:
        tasks = [p.schedule for p in self._pollers if p.schedule is not None and not p.schedule.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_links(self) -> None:
        for link in self._links:
            link.close()

    async def _schedule(self, poller: _Poller) -> None:
        """Poll at multiples of interval_s plus the device's phase (wall clock), sleeping until the next due one. A
        poll that overran the next tick (a slow device, an interval shorter than a poll) is followed by the next one
        at once, standing for the latest tick passed; the ticks before it are skipped and counted, never stacked.
        Ticks passed while the device's last reading waits for the sink are skipped and counted; those of a backoff
        are not polled. Follows wall clock steps (NTP at boot) instead of drifting off the grid."""
        interval, phase = poller.config.interval_s, poller.phase_s
        await poller.link.open(poller.config.timeout_s)
        tick: int | None = None
        while not self._stopped:  # also ends a task whose cancellation a library dropped
            tick = await self._sleep_to_due(poller, tick)
            while not self._stopped:
                if poller.handing:
                    poller.skipped_overlaps += 1
                    break
                await self._poll(poller)
                latest = math.floor((self._clock() - phase) / interval)
                if latest <= tick:  # on time: sleep to the next tick
                    break
                if poller.retry_at:  # failed: the ticks passed are skipped, then the backoff's are not polled
                    poller.skipped_overlaps += latest - tick
                    tick = latest
                    break
                poller.skipped_overlaps += latest - tick - 1
                tick = latest
                await asyncio.sleep(0)  # the reading's hand-off (end of this turn of the loop) comes first

    async def _sleep_to_due(self, poller: _Poller, last: int | None) -> int:
        """Sleep until the device's next due tick, after `last` and after its backoff; returns that tick."""
        loop = asyncio.get_running_loop()
        interval, phase = poller.config.interval_s, poller.phase_s
        now = self._clock()
        tick = math.floor((now - phase + max(0.0, poller.retry_at - loop.time())) / interval) + 1
        if tick == last:  # woke a hair before the tick just handled (a clock stepped back goes on from where it is)
            tick += 1
        await asyncio.sleep(tick * interval + phase - now)
        return tick

    async def _poll(self, poller: _Poller) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        poller.polls += 1
        try:
            reading = await self._read_all(poller)
        except _DeviceDown as exc:
            self._failed(poller, str(exc))
            return
        except _NoReading as exc:
            self._no_reading(poller, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a bug: keep polling, but say it
            self._unexpected(poller, exc)
            return
        finally:
            poller.last_poll_s = loop.time() - started
        poller.availability.succeeded()
        poller.failed_in_a_row = poller.empty_in_a_row = 0
        poller.retry_at, poller.unexpected_logged = 0.0, False
        self._queue_for_sink(poller, reading)

    async def _read_all(self, poller: _Poller) -> RawReading:
        """One reading of the device: every planned request, decoded."""
        config = poller.config
        values: dict[str, Any] = {}
        ts: float | None = None
        for index, request in enumerate(poller.plan):
            words, sent = await self._read(poller, index, request)
            ts = sent if ts is None else ts
            try:
                values.update(poller.decoders[index](words))
            except ValueError as exc:
                raise _NoReading(f"{request.describe()}: cannot decode the answer: {exc}") from None
        values[self._type_key] = config.machine_type
        received = self._clock()
        # No payload: the pipeline writes the fields as JSON for the quarantine, the only place that needs it.
        return RawReading(config.machine_id, received if ts is None else ts, values, poller.source, received)

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
                raise _NoReading(error) from None
            else:
                if poller.logged:
                    poller.logged = {key for key in poller.logged if key[0] != index}
                return words, self._clock() - (loop.time() - sent)
        raise _DeviceDown(error)

    def _refused(self, poller: _Poller, index: int, request: ReadRequest, exc: DeviceException) -> None:
        """The device answered with an exception: its link works, this request does not. Logged once per request
        and code (again only after the request has read well), counted always."""
        config = poller.config
        if (index, exc.code) in poller.logged:
            return
        poller.logged.add((index, exc.code))
        log.warning("Modbus device %s (%s unit %d) answered %s to a read of %s: %s. Counted from now on; logged "
                    "again only after this read works", config.machine_id, poller.link.name, config.unit_id, exc,
                    request.describe(), exc.hint or "see the device's manual",
                    extra={"connection": poller.availability.name})

    def _failed(self, poller: _Poller, error: str) -> None:
        """The device did not answer: down now, and retried with backoff."""
        poller.failed_polls += 1
        poller.failed_in_a_row += 1
        poller.availability.failed(error)
        config = poller.config
        delay = backoff_s(poller.failed_in_a_row, config.interval_s, config.backoff_max_s, random.random())
        poller.retry_at = asyncio.get_running_loop().time() + delay  # the ticks before it are not polled

    def _no_reading(self, poller: _Poller, error: str) -> None:
        """The device answered but the poll yielded no reading: down after DOWN_AFTER_POLLS of them in a row (its
        link works: polled on at its interval, no backoff)."""
        poller.failed_polls += 1
        poller.empty_in_a_row += 1
        poller.failed_in_a_row, poller.retry_at = 0, 0.0
        if poller.empty_in_a_row >= DOWN_AFTER_POLLS or not poller.availability.up:
            poller.availability.failed(error)

    def _unexpected(self, poller: _Poller, exc: BaseException) -> None:
        """What no handler expected (a bug, a library raising what it should not): counted, its traceback logged
        once until the device yields a reading again, the device down and retried with backoff."""
        poller.internal_errors += 1
        config = poller.config
        if not poller.unexpected_logged:
            poller.unexpected_logged = True
            log.error("Modbus device %s (%s unit %d): unexpected error, counted and retried with backoff; logged "
                      "again only after a reading: %r", config.machine_id, poller.link.name, config.unit_id, exc,
                      exc_info=exc, extra={"connection": poller.availability.name})
        self._failed(poller, f"unexpected error: {exc!r}")

    def _queue_for_sink(self, poller: _Poller, reading: RawReading) -> None:
        """Queue the reading for the sink thread; the first one queued in this turn of the loop schedules the batch's
        hand-off for the end of the turn."""
        poller.handing = True
        self._outgoing.append((poller, reading))
        if len(self._outgoing) == 1:
            asyncio.get_running_loop().call_soon(self._hand_off)

    def _hand_off(self) -> None:
        batch, self._outgoing = self._outgoing, []
        offer = self._offer
        if offer is not None and not self._stopped and self._submitted == self._put:
            # Offered in order until the sink is full; after that, and while batches wait for the sink thread,
            # readings go behind them to keep their order.
            taken = 0
            for poller, reading in batch:
                if not offer(reading):
                    break
                poller.readings += 1
                poller.last_reading_ts = reading.ts
                poller.handing = False
                taken += 1
            batch = batch[taken:]
        sink = self._threads.sink
        if sink is not None and batch:
            self._submitted += 1
            sink.submit(self._hand, batch, asyncio.get_running_loop())

    # --- on the sink thread ---
    def _hand(self, batch: list[tuple[_Poller, RawReading]], loop: asyncio.AbstractEventLoop) -> None:
        """Put each reading of the batch, in order. The loop offers nothing while a batch waits here, so a device's
        counters are written by one thread at a time."""
        try:
            self._put_all(batch, loop)
        finally:
            self._put += 1

    def _put_all(self, batch: list[tuple[_Poller, RawReading]], loop: asyncio.AbstractEventLoop) -> None:
        for poller, reading in batch:
            sink = self._sink
            if self._stopped or sink is None:
                return
            try:
                sink.put(reading)
            except Exception as exc:  # noqa: BLE001 - a sink's bug: said and counted on the loop, polling goes on
                loop.call_soon_threadsafe(self._unexpected, poller, exc)
            else:
                poller.readings += 1
                poller.last_reading_ts = reading.ts
            poller.handing = False

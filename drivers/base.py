"""What every driver hands to the pipeline, and the small interface a driver implements.

Who calls what: the agent starts each driver with a sink (the pipeline); the driver's own thread or event loop
calls `sink.put()` for every reading it receives, which blocks while the pipeline is full (back-pressure reaches
the device or the broker, memory stays bounded). The pipeline calls `reading.ack()` once the reading, or its
rejection, is committed (a `BatchAck` together with the others of its sender, in one call). `stop()` may be called
at any time, twice, or without `start()`; once it returns the driver puts nothing more. `close()` (after `stop()`,
or instead of it) disconnects; it too is safe twice and without `start()`. `stats()` may be called from any thread
at any time, before `start()` and after `close()` included, and never raises: it is what the status API and the
metrics show of the driver.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import AfterValidator, StringConstraints

from model.validate import Rejection

MachineId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
MachineType = Literal["L", "M", "H"]
SOURCE_MAX_CHARS = 256  # of a reading's source: an MQTT topic may be 65,535 bytes long
CUT_MARK = "…[cut]"


def _nonzero(scale: float) -> float:
    if scale == 0:
        raise ValueError("a scale of 0 turns every reading into the offset; use 1 for no scaling")
    return scale


Scale = Annotated[float, AfterValidator(_nonzero)]  # reading = raw * scale + offset, in a device's input table


def cut(text: str, limit: int) -> str:
    """`text`, or its first characters and CUT_MARK when it is longer than `limit` characters."""
    return text if len(text) <= limit else text[:limit - len(CUT_MARK)] + CUT_MARK


@dataclass(slots=True)
class RawReading:
    machine_id: str | None
    ts: float  # epoch seconds, UTC: when it was measured, else when it was received
    fields: dict[str, Any]  # model inputs and machine type as received; validated by the pipeline
    source: str  # e.g. "mqtt:pdm/press-1/telemetry", "modbus:press-1"
    received_at: float
    payload: str = ""  # the raw payload, kept for the quarantine if the reading is rejected ("": its fields as JSON)
    rejection: Rejection | None = None  # set when the driver could not make a reading of the payload
    ack: Callable[[], object] | None = None  # to call once committed (an MQTT QoS 1 PUBACK); its result is ignored


class BatchAck:
    """A reading's ack that can go out with those of other readings from the same sender: the pipeline calls
    `send(tokens)` once per sender and committed batch (an MQTT driver sends all its PUBACKs in one write) instead
    of each ack alone. Called alone, it acknowledges its own reading."""

    __slots__ = ("send", "token")

    def __init__(self, send: Callable[[list[Any]], object], token: Any) -> None:
        self.send = send  # the same object for every ack it can send together
        self.token = token  # what `send` needs to acknowledge this reading (an MQTT message id)

    def __call__(self) -> object:
        return self.send([self.token])


class Sink(Protocol):
    def put(self, reading: RawReading) -> None: ...


@runtime_checkable
class OfferingSink(Sink, Protocol):
    """A sink that can also take a reading without waiting: an event loop (drivers/modbus.py) offers it there and
    hands only what is refused to a thread that may block in put()."""

    def offer(self, reading: RawReading) -> bool:
        """Take the reading if there is room now, never waiting for room; False when full."""
        ...


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """One device (a Modbus device, an OPC UA server) of a driver, since the driver started."""

    device: str
    connected: bool  # it yields readings (a Modbus device), its session is up (an OPC UA server)
    errors: Mapping[str, int]  # error counts by kind (e.g. timeouts, connect_failures)
    last_error: str | None
    polls: int = 0  # for a polled device: polls started
    skipped_polls: int = 0  # polls skipped because the previous one was still running


@dataclass(frozen=True, slots=True)
class DriverStats:
    """What a driver reports of itself (`Driver.stats()`): the status API and the metrics read this alone."""

    name: str
    connected: bool | None  # every device, or the broker connection, is up; None: cannot tell
    errors: Mapping[str, int]  # error counts by kind, over the driver's own connection and all its devices
    last_error: str | None
    devices: tuple[DeviceStats, ...] = ()  # per device, for drivers that have several
    details: Mapping[str, Any] = field(default_factory=dict)  # the driver's own description, shown as it is

    @classmethod
    def of_devices(cls, name: str, devices: tuple[DeviceStats, ...], details: Mapping[str, Any]) -> DriverStats:
        """A driver that is the sum of its devices: connected when all are, errors added up by kind."""
        errors: dict[str, int] = {}
        for device in devices:
            for kind, n in device.errors.items():
                errors[kind] = errors.get(kind, 0) + n
        return cls(name=name, connected=bool(devices) and all(d.connected for d in devices), errors=errors,
                   last_error=next((d.last_error for d in devices if d.last_error), None), devices=devices,
                   details=details)


class Driver(Protocol):
    """One kind of input (drivers/mqtt.py, drivers/modbus.py, drivers/opcua.py); see the module docstring for who
    calls what."""

    name: str

    def start(self, sink: Sink) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...

    def stats(self) -> DriverStats: ...


class Availability:
    """Whether one connection works: logs the first failure and the recovery, counts everything in between.

    Drivers (and the pipeline's database writes) report every attempt, so a link that stays down for an hour logs
    one line, and one more when it is back."""

    def __init__(self, name: str, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.failures = 0  # since it last worked
        self.failures_total = 0
        self.last_error: str | None = None
        self._logger = logger
        self._clock = clock
        self._down_since: float | None = None

    @property
    def up(self) -> bool:
        return self._down_since is None

    def failed(self, error: str) -> None:
        self.failures += 1
        self.failures_total += 1
        self.last_error = error
        if self._down_since is None:
            self._down_since = self._clock()
            self._logger.warning("%s unavailable: %s", self.name, error, extra={"connection": self.name})

    def succeeded(self) -> None:
        if self._down_since is not None:
            self._logger.info(
                "%s available again after %.0f s and %d failed attempts", self.name,
                self._clock() - self._down_since, self.failures, extra={"connection": self.name},
            )
            self._down_since = None
        self.failures = 0

"""What every driver hands to the pipeline, and the small interface a driver implements.

Who calls what: the agent starts each driver with a sink (the pipeline); the driver's own thread or event loop
calls `sink.put()` for every reading it receives, which blocks while the pipeline is full (back-pressure reaches
the device or the broker, memory stays bounded). The pipeline calls `reading.ack()` once the reading, or its
rejection, is committed. `stop()` may be called at any time, twice, or without `start()`; once it returns the
driver puts nothing more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import StringConstraints

from model.validate import Rejection

MachineId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
MachineType = Literal["L", "M", "H"]
SOURCE_MAX_CHARS = 256  # of a reading's source: an MQTT topic may be 65,535 bytes long
CUT_MARK = "…[cut]"


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
    payload: str = ""  # the raw payload, kept for the quarantine if the reading is rejected
    rejection: Rejection | None = None  # set when the driver could not make a reading of the payload
    ack: Callable[[], None] | None = None  # to call once committed (an MQTT QoS 1 PUBACK)


class Sink(Protocol):
    def put(self, reading: RawReading) -> None: ...


class Driver(Protocol):
    name: str

    def start(self, sink: Sink) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


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

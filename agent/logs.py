"""Logging: JSON lines for journald and log shippers, readable text on a terminal; state changes, not repeats.

Who calls it: `pdm-edge run` calls `setup()` once; drivers and the sync client keep one `Availability` per
connection and report every attempt to it, so a link that stays down logs one line, and one more when it is back.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, any `extra=` fields, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **{k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str = "INFO", fmt: str = "auto", stream=None) -> None:
    """Configure the root logger; fmt "auto" is text on a terminal and JSON otherwise (journald, files, pipes)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class Availability:
    """Whether one connection works: logs the first failure and the recovery, counts everything in between."""

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

"""Logs an operator reads in journalctl: one JSON object per line, one line per state change."""

from __future__ import annotations

import io
import json
import logging

import pytest

from drivers.base import Availability
from web.logs import setup


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_json_lines_when_not_on_a_terminal_with_extra_fields():
    stream = io.StringIO()
    setup("INFO", "auto", stream)
    logging.getLogger("pdm.test").warning("device %s timed out", "press-1", extra={"machine_id": "press-1"})
    logging.getLogger("pdm.test").debug("not shown at INFO")
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "pdm.test"
    assert entry["message"] == "device press-1 timed out" and entry["machine_id"] == "press-1"
    assert entry["ts"].endswith("+00:00")


def test_text_when_asked():
    stream = io.StringIO()
    setup("DEBUG", "text", stream)
    logging.getLogger("pdm.test").info("hello")
    assert stream.getvalue().rstrip().endswith("INFO    pdm.test: hello")


def test_a_connection_that_stays_down_logs_once_and_once_when_back(caplog):
    clock = FakeClock()
    broker = Availability("mqtt broker 127.0.0.1:1883", logging.getLogger("pdm.test"), clock)
    with caplog.at_level(logging.INFO, "pdm.test"):
        for attempt in range(50):
            broker.failed(f"connection refused (attempt {attempt})")
            clock.now += 2
        assert not broker.up and broker.failures == 50 and broker.last_error.endswith("(attempt 49)")
        broker.succeeded()
        broker.succeeded()
    assert [r.getMessage() for r in caplog.records] == [
        "mqtt broker 127.0.0.1:1883 unavailable: connection refused (attempt 0)",
        "mqtt broker 127.0.0.1:1883 available again after 100 s and 50 failed attempts",
    ]
    assert broker.up and broker.failures == 0 and broker.failures_total == 50

"""systemd's notify protocol: READY after start-up, WATCHDOG pings only while the pipeline makes progress."""

from __future__ import annotations

import signal
import socket
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest

from testkit.mqtt import Publisher
from tests.agent.test_run import reading, wait_for
from tests.drivers.test_mqtt_broker import Agent


@pytest.fixture
def notify_socket():
    folder = Path(tempfile.mkdtemp(prefix="notify-"))  # short: a Unix socket path has at most 107 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    sock.settimeout(0.1)
    yield sock, str(folder / "notify")
    sock.close()


class Messages:
    """What the agent told 'systemd', with arrival times."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.received: list[tuple[float, str]] = []

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return
            self.received += [(time.monotonic(), line) for line in data.decode().splitlines()]

    def count(self, text: str, since: float = 0.0) -> int:
        self.drain()
        return sum(1 for at, line in self.received if line == text and at >= since)


def test_ready_after_start_then_watchdog_pings_that_stop_while_the_pipeline_is_stuck(
        tmp_path, private_broker, notify_socket):
    sock, path = notify_socket
    messages = Messages(sock)
    agent = Agent(tmp_path, private_broker.url, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    try:
        agent.start(until="started")
        wait_for(lambda: messages.count("READY=1") == 1, 30, "READY")
        wait_for(lambda: messages.count("WATCHDOG=1") >= 3, 10, "watchdog pings every half second")

        with sqlite3.connect(agent.data / "agent.db", timeout=1) as lock:  # another writer holds the database
            lock.execute("BEGIN EXCLUSIVE")
            with Publisher(private_broker.url) as publisher:
                publisher.publish_all([reading(1, 0)])
            wait_for(lambda: agent.count_log("not pinging the watchdog") >= 1, 30, "the pipeline to be stuck")
            messages.drain()  # what was sent before it got stuck is stamped before `stuck`
            stuck = time.monotonic()
            wait_for(lambda: time.monotonic() - stuck > 2.0, 5, "two seconds")
            assert messages.count("WATCHDOG=1", since=stuck + 0.1) == 0
            lock.rollback()

        wait_for(lambda: agent.count("readings") == 1, 30, "the reading, once the database is free")
        resumed = time.monotonic()
        wait_for(lambda: messages.count("WATCHDOG=1", since=resumed) >= 2, 10, "pings again")
        assert agent.signal(signal.SIGTERM) == 0
        assert messages.count("STOPPING=1") == 1
    finally:
        agent.stop()

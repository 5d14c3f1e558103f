"""Central misbehaving, seen from the agent's sync client with a real SQLite outbox (SPEC §6):
- a server we control answers 500s, answers too slowly, sends garbage, closes the connection mid-body, or answers
  200 with something that is not central's answer for the batch sent: every round is retried later, nothing leaves the outbox,
  nothing is set aside; then the real central takes everything, once;
- central unreachable for a day of compressed time: every wait stays within the backoff cap, nothing is lost, and
  the first round after central is back syncs the whole backlog.
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from socketserver import BaseRequestHandler, ThreadingTCPServer

import psycopg
import pytest

from agent.machines import Machines
from agent.store import Store
from model.package import load
from sync.client import BACKOFF_MAX_S, BACKOFF_MIN_S, SyncClient
from sync.config import CentralConfig
from sync.outbox import Outcome
from sync.protocol import GatewayStatus
from sync.remote import AlarmsConfig, SummaryConfig
from testkit.net import LOCALHOST, free_port
from tests.agent.test_summaries import stored
from tests.central.support import Server
from tests.scale import scaled

T0 = 1_790_000_000.0
TIMEOUT_S = 0.5  # the client's; the slow server answers later than this


class MisbehavingCentral:
    """A TCP server on loopback that reads each request and answers in the current `mode`."""

    BODY = json.dumps({"error": {"code": "internal", "message": "boom"}}).encode()

    def __init__(self) -> None:
        self.mode = "500"
        self.requests = 0
        self.release = threading.Event()  # ends the slow answers when the test is over
        central = self

        class Handler(BaseRequestHandler):
            def handle(self) -> None:
                if not _read_request(self.request):
                    return
                central.requests += 1
                central.answer(self.request)

        ThreadingTCPServer.daemon_threads = True
        ThreadingTCPServer.allow_reuse_address = True
        self.server = ThreadingTCPServer((LOCALHOST, 0), Handler)
        self.url = f"http://{LOCALHOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, sock: socket.socket) -> None:
        if self.mode == "500":
            sock.sendall(b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(self.BODY), self.BODY))
        elif self.mode == "slow":
            self.release.wait(TIMEOUT_S * 6)
        elif self.mode == "garbage":
            sock.sendall(bytes(range(256)) * 4)
        elif self.mode == "cut":  # promises 1,000 bytes, sends 20, closes
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                         b'{"accepted": {"summ')
        elif self.mode == "200-not-central":  # e.g. a captive portal or a misrouted proxy
            page = b"<html><body>Welcome to the plant Wi-Fi</body></html>"
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(page), page))
        elif self.mode == "200-miscounted":  # central's answer, but for another batch
            answer = json.dumps({"accepted": {"summaries": 1, "events": 0},
                                 "duplicates": {"summaries": 0, "events": 0}}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
        sock.close()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _read_request(sock: socket.socket) -> bool:
    """Read one HTTP request (headers and its Content-Length of body); False if the client went away."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        body += chunk
    return True


@functools.cache
def shipped():
    return load()


def fill_outbox(store: Store, gateway: str, windows: int, machines: int = 3, start: int = 0) -> None:
    """Summaries of `windows` 60 s windows of each machine, and an event, as the pipeline writes them."""
    model = Machines(gateway, SummaryConfig(window_s=60), AlarmsConfig(), shipped(), {})
    outbox = []
    for w in range(start, start + windows + 1):  # the reading of the next window closes the one before
        readings = [stored(T0 + 60 * w, machine=f"m{m}") for m in range(machines)]
        outbox += model.update(readings, [], T0 + 60 * w)[0]
    outbox.append(model._event(stored(T0 + 60 * start + 1, machine="m0"), "ok", "warning", T0))
    store.write([], [], outbox)


def sync_client(store: Store, url: str, gateway: str, token: str, **config) -> SyncClient:
    settings = CentralConfig(url=url, token=token, timeout_s=TIMEOUT_S, allow_insecure_http=True,
                             **{"batch_size": 20, **config})
    return SyncClient(settings, gateway, "0.1.0", store,
                      lambda: GatewayStatus(buffer_pending=0, dropped_total=0, uptime_s=1.0))


def at_central(central_url: str, gateway: str) -> tuple[list[str], list[str]]:
    with psycopg.connect(central_url) as conn:
        summaries = [r for (r,) in conn.execute(
            "SELECT s.summary_id::text FROM summaries s JOIN gateways g ON g.id = s.gateway_id WHERE g.name = %s",
            (gateway,))]
        events = [r for (r,) in conn.execute(
            "SELECT e.event_id::text FROM events e JOIN gateways g ON g.id = e.gateway_id WHERE g.name = %s",
            (gateway,))]
    return summaries, events


def assert_exactly_once_at_central(store: Store, central_url: str, gateway: str) -> None:
    summaries, events = at_central(central_url, gateway)
    assert len(summaries) == len(set(summaries)) and len(events) == len(set(events))
    assert set(summaries) == {r.record_id for r in store.outbox("summary", pending=False)}
    assert set(events) == {r.record_id for r in store.outbox("event", pending=False)}
    assert store.outbox_backlog()[0] == 0




@pytest.fixture
def misbehaving():
    server = MisbehavingCentral()
    yield server
    server.close()


MODES = ("500", "slow", "garbage", "cut", "200-not-central", "200-miscounted")


def test_central_answering_500s_slowly_garbage_or_cut_mid_body_keeps_everything_then_syncs_once(
        tmp_path, misbehaving, central_url, gateways):
    name, token = gateways.add("misbehaving")
    with Store.open(tmp_path / "agent.db") as store:
        fill_outbox(store, name, windows=30)
        pending = store.outbox_backlog()[0]
        client = sync_client(store, misbehaving.url, name, token)
        delays = []
        for mode in MODES:
            misbehaving.mode = mode
            before = misbehaving.requests
            result = client.sync_once()
            assert result.outcome is Outcome.RETRY, (mode, result)
            assert misbehaving.requests == before + 1, mode  # one attempt a round: the backoff is the sync loop's
            assert result.sent == result.set_aside == 0, mode
            assert store.outbox_backlog()[0] == pending, mode  # nothing left the outbox
            delays.append(result.retry_after)
            print(f"\n{mode}: {result.error}")
        assert all(BACKOFF_MIN_S / 2 <= d <= BACKOFF_MAX_S for d in delays), delays
        client.close()

        port = free_port()
        central = Server.central(central_url, tmp_path / "central.log", port)
        try:
            client = sync_client(store, central.base, name, token)
            assert client.sync_once().outcome is Outcome.SYNCED
            client.close()
        finally:
            central.terminate()
        assert_exactly_once_at_central(store, central_url, name)


def test_central_unreachable_for_a_day_of_compressed_time_backs_off_within_the_cap_and_catches_up(
        tmp_path, central_url, gateways):
    name, token = gateways.add("outage")
    port = free_port()  # nothing listens there until central starts
    outage_s = scaled(24 * 3600, 7 * 24 * 3600)
    with Store.open(tmp_path / "agent.db") as store:
        client = sync_client(store, f"http://{LOCALHOST}:{port}", name, token, batch_size=200)
        clock, rounds, delays, windows = 0.0, 0, [], 0
        started = time.monotonic()
        while clock < outage_s:
            due = int(clock // 60) + 1  # the windows that closed on the compressed clock: 3 machines, one a minute
            if due > windows:
                fill_outbox(store, name, due - windows, start=windows)
                windows = due
            result = client.sync_once()
            assert result.outcome is Outcome.RETRY and result.sent == 0, result
            delays.append(result.retry_after)
            clock += result.retry_after
            rounds += 1
        pending = store.outbox_backlog()[0]
        assert pending == len(store.outbox(pending=False)) >= 3 * windows  # nothing lost, nothing sent

        central = Server.central(central_url, tmp_path / "central.log", port)
        try:
            caught_up = time.monotonic()
            assert client.sync_once().outcome is Outcome.SYNCED  # the first round once it is back
            caught_up = time.monotonic() - caught_up
            client.close()
        finally:
            central.terminate()
        assert_exactly_once_at_central(store, central_url, name)
    print(f"\noutage of {outage_s / 3600:g} h compressed into {time.monotonic() - started:.1f} s: {rounds} rounds, "
          f"waits {min(delays):.1f}-{max(delays):.1f} s, {pending} records caught up in {caught_up:.1f} s")
    assert max(delays) <= BACKOFF_MAX_S
    assert min(delays[8:]) >= BACKOFF_MAX_S / 2  # after the ramp the waits stay near the cap: no hammering
    assert rounds <= outage_s / (BACKOFF_MAX_S / 2) + 20

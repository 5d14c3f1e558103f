"""The agent's sync client (sync/client.py) against a real `pdm-central serve`: both ends of SPEC §6 together."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from sync.client import SyncClient
from sync.config import CentralConfig
from sync.outbox import Outcome
from sync.protocol import GatewayStatus
from testkit import batches
from testkit.net import free_port
from tests.central.support import PDM_CENTRAL, Server, environment


@dataclass
class Record:
    kind: str
    record_id: str
    body: str


class MemoryOutbox:
    def __init__(self, records: list[Record]) -> None:
        self.records = list(records)
        self.synced: list[str] = []
        self.aside: list[tuple[str, str]] = []

    def pending(self, limit: int) -> list[Record]:
        done = set(self.synced) | {record_id for record_id, _ in self.aside}
        waiting = [r for r in self.records if r.record_id not in done]
        return sorted(waiting, key=lambda r: r.kind != "event")[:limit]

    def mark_synced(self, record_ids) -> None:
        self.synced += list(record_ids)

    def set_aside(self, records, reason: str) -> None:
        self.aside += [(r.record_id, reason) for r in records]


def records(name: str, summaries: list[dict], events: list[dict]) -> list[Record]:
    return ([Record("summary", s["summary_id"], json.dumps(s)) for s in summaries]
            + [Record("event", e["event_id"], json.dumps(e)) for e in events])


@pytest.fixture(scope="module")
def central(central_url, tmp_path_factory):
    port = free_port()
    server = Server([PDM_CENTRAL, "serve", "--port", str(port)], environment(central_url), port,
                    tmp_path_factory.mktemp("central") / "log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.terminate()


def client(server: Server, name: str, token: str, outbox: MemoryOutbox, batch_size: int = 500) -> SyncClient:
    config = CentralConfig(url=server.base, token=token, batch_size=batch_size)
    status = GatewayStatus(buffer_pending=len(outbox.records), dropped_total=0, uptime_s=10.0)
    return SyncClient(config, name, "0.1.0", outbox, lambda: status)


def stored(conn, name: str) -> tuple[int, int]:
    return conn.execute("""
        SELECT (SELECT count(*) FROM summaries s WHERE s.gateway_id = g.id),
               (SELECT count(*) FROM events e WHERE e.gateway_id = g.id)
        FROM gateways g WHERE g.name = %s""", [name]).fetchone()


def test_a_round_syncs_everything_and_a_resend_is_harmless(central, gateways, conn):
    name, token = gateways.add("sync")
    summaries = batches.many(name, machines=3, windows=40)
    events = [batches.event(name, f"m-{m:03d}", minute=m) for m in range(3)]
    outbox = MemoryOutbox(records(name, summaries, events))
    sync = client(central, name, token, outbox, batch_size=50)
    result = sync.sync_once()
    assert result.outcome == Outcome.SYNCED and result.sent == 123 and result.set_aside == 0, result
    assert stored(conn, name) == (120, 3)
    # The answers were lost: the agent sends everything again. Central stores nothing twice.
    again = MemoryOutbox(records(name, summaries, events))
    assert client(central, name, token, again).sync_once().outcome == Outcome.SYNCED
    assert stored(conn, name) == (120, 3)
    sync.close()


def test_an_invalid_record_is_set_aside_with_centrals_reason(central, gateways, conn):
    name, token = gateways.add("sync")
    good = [batches.summary(name, minute=m) for m in range(7)]
    bad = batches.summary(name, minute=99)
    bad["window_end"] = bad["window_start"]
    outbox = MemoryOutbox(records(name, [*good[:3], bad, *good[3:]], []))
    result = client(central, name, token, outbox).sync_once()
    assert result.outcome == Outcome.SYNCED and result.sent == 7 and result.set_aside == 1, result
    assert outbox.aside[0][0] == bad["summary_id"] and "window_end must be after window_start" in outbox.aside[0][1]
    assert stored(conn, name) == (7, 0)


def test_a_revoked_gateway_is_refused_and_keeps_its_records(central, gateways):
    name, token = gateways.add("sync")
    gateways.revoke(name)
    outbox = MemoryOutbox(records(name, [batches.summary(name)], []))
    result = client(central, name, token, outbox).sync_once()
    assert result.outcome == Outcome.REFUSED and outbox.synced == [] and outbox.aside == []
    assert "401" in result.error


def test_a_database_outage_is_retried_after_centrals_retry_after(tmp_path, gateways):
    name, token = gateways.add("sync")
    port = free_port()
    env = environment(f"postgresql://postgres@127.0.0.1:{free_port()}/x", PDM_CENTRAL_DB_TIMEOUT_S="0.5")
    server = Server([PDM_CENTRAL, "serve", "--port", str(port)], env, port, tmp_path / "log")
    try:
        server.wait_ready(path="/healthz")
        outbox = MemoryOutbox(records(name, [batches.summary(name)], []))
        result = client(server, name, token, outbox).sync_once()
    finally:
        server.terminate()
    assert result.outcome == Outcome.RETRY and result.retry_after == 5.0 and outbox.synced == []
    assert "503" in result.error


@pytest.mark.parametrize("wrong", ["revoked", "unknown", "another gateway's"])
def test_a_wrong_token_shows_at_the_first_round_with_nothing_to_send(central, gateways, wrong):
    """Issue 22 item 9: a mis-provisioned gateway looked synced (a fresh last_success, no error) until it had data.
    The round's token check (GET .../desired) makes it show at once."""
    (name, token), (_, other_token) = gateways.add(), gateways.add()
    if wrong == "revoked":
        gateways.revoke(name)
    sync = client(central, name, {"unknown": "pdmgw_" + "x" * 43, "another gateway's": other_token}.get(wrong, token),
                  MemoryOutbox([]))
    result = sync.sync_once()
    assert result.outcome is Outcome.REFUSED, result
    assert sync.last_success is None and sync.last_error and sync.last_error.startswith(("401", "403"))


def test_a_good_token_is_checked_each_round_cheaply(central, gateway):
    name, token = gateway
    sync = client(central, name, token, MemoryOutbox([]))
    assert sync.sync_once().outcome is Outcome.SYNCED and sync.last_error is None
    assert sync.sync_once().outcome is Outcome.SYNCED and sync.last_success is not None

"""The sync client against a scripted HTTP server on loopback (injected faults) and a real SQLite outbox."""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sync.client import SyncClient
from sync.config import CentralConfig
from sync.outbox import Outcome
from sync.protocol import GatewayStatus, IngestBatch

TOKEN = "t0ken-for-tests-0123456789"


class Central:
    """Answers each POST with the next scripted (status, headers, body), or with `judge(batch)`; records batches.
    The token check (GET .../desired) gets `desired` (status, body): 200 with an ETag, 304 when it matches."""

    ETAG = '"desired-0"'

    def __init__(self) -> None:
        self.script: list[tuple[int, dict, dict]] = []
        self.desired: tuple[int, dict] = (200, {"revision": 0})
        self.checks: list[tuple[str, dict]] = []
        self.judge = None
        self.batches: list[dict] = []
        self.headers: list[dict] = []
        central = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                central.checks.append((self.path, dict(self.headers)))
                status, body = central.desired
                if status == 200 and self.headers.get("If-None-Match") == central.ETAG:
                    status = 304
                payload = json.dumps(body).encode() if status != 304 else b""
                self.send_response(status)
                self.send_header("ETag", central.ETAG)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                batch = json.loads(gzip.decompress(raw))
                central.batches.append(batch)
                central.headers.append(dict(self.headers))
                status, headers, body = central.script.pop(0) if central.script else central.judge(batch)
                payload = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def accept_all(batch):
    return 200, {}, {"accepted": {"summaries": len(batch["summaries"]), "events": len(batch["events"])},
                     "duplicates": {"summaries": 0, "events": 0}}


def records(store, n_events=0, n_summaries=0):
    from agent.machines import Machines
    from model.package import load
    from sync.remote import AlarmsConfig, SummaryConfig
    from tests.agent.test_summaries import stored

    machines = Machines("gw-1", SummaryConfig(window_s=60), AlarmsConfig(), load(), {})
    outbox = []
    for i in range(n_summaries + 1):  # each reading in a new window closes the one before
        outbox += machines.update([stored(1_790_000_000.0 + 60 * i)], [], 0)[0]
    outbox += [machines._event(stored(1_790_000_000.0 + i), "ok", "warning", 0) for i in range(n_events)]
    store.write([], [], outbox)
    return store.pending(10_000)


def client(store, url, batch_size=500):
    config = CentralConfig(url=url, token=TOKEN, batch_size=batch_size, allow_insecure_http=True)
    status = lambda: GatewayStatus(buffer_pending=0, dropped_total=0, uptime_s=1.0)
    return SyncClient(config, "gw-1", "0.1.0", store, status)


def test_events_go_first_and_records_leave_the_outbox_only_after_a_200(store, central):
    pending = records(store, n_events=3, n_summaries=5)
    result = client(store, central.url, batch_size=3).sync_once()
    assert (result.outcome, result.sent) == (Outcome.SYNCED, len(pending))
    assert [(len(b["events"]), len(b["summaries"])) for b in central.batches] == [(3, 0), (0, 3), (0, 2)]
    batch = IngestBatch.model_validate(central.batches[0])  # the wire format is the shared schema
    assert batch.gateway_id == "gw-1"
    assert central.headers[0]["Authorization"] == f"Bearer {TOKEN}" and central.headers[0]["Content-Encoding"] == "gzip"
    assert store.pending(100) == []


def test_a_5xx_keeps_everything_and_honours_retry_after(store, central):
    records(store, n_events=2)
    central.script = [(503, {"Retry-After": "7"}, {"error": {"code": "database_unavailable", "message": "db down"}})]
    result = client(store, central.url).sync_once()
    assert (result.outcome, result.retry_after) == (Outcome.RETRY, 7.0)
    assert "503" in result.error and "db down" in result.error
    assert len(store.pending(100)) == 2
    assert client(store, central.url).sync_once().outcome is Outcome.SYNCED  # the same records, sent again


def test_an_unreachable_central_backs_off_with_jitter(store):
    records(store, n_events=1)
    sync = client(store, "http://127.0.0.1:9")  # discard port: nothing listens
    delays = [sync.sync_once().retry_after for _ in range(4)]
    assert 1.0 <= delays[0] <= 2.0 and 8.0 <= delays[3] <= 16.0
    assert len(store.pending(100)) == 1


@pytest.mark.parametrize("status", [401, 403, 400, 415])
def test_a_refused_gateway_stops_and_deletes_nothing(store, central, status):
    records(store, n_events=2)
    central.script = [(status, {}, {"error": {"code": "unauthorized", "message": "bad token"}})]
    result = client(store, central.url).sync_once()
    assert result.outcome is Outcome.REFUSED and result.retry_after >= 600
    assert len(central.batches) == 1 and len(store.pending(100)) == 2


def test_invalid_records_are_isolated_and_set_aside_with_the_reason_the_rest_is_sent(store, central):
    pending = records(store, n_events=8)
    poison = pending[5].record_id

    def judge(batch):
        if any(e["event_id"] == poison for e in batch["events"]):
            return 422, {}, {"error": {"code": "invalid", "message": "machine_id too long"}}
        return accept_all(batch)

    central.judge = judge
    result = client(store, central.url).sync_once()
    assert (result.outcome, result.sent, result.set_aside) == (Outcome.SYNCED, 7, 1)
    assert store.pending(100) == []
    with store._guard("test") as db:
        assert db.execute("SELECT record_id, reason FROM dead_letters").fetchall() == [
            (poison, "422: machine_id too long")]
    assert store.counters().set_aside["event"] == 1


def test_a_batch_too_large_is_split(store, central):
    records(store, n_events=6)
    central.judge = lambda batch: (413, {}, {"error": {"code": "too_large", "message": "too large"}}) \
        if len(batch["events"]) > 2 else accept_all(batch)
    result = client(store, central.url).sync_once()
    assert (result.outcome, result.sent, result.set_aside) == (Outcome.SYNCED, 6, 0)
    assert [len(b["events"]) for b in central.batches] == [6, 3, 1, 2, 3, 1, 2]


def test_ids_do_not_depend_on_the_utc_offset_of_the_same_instant():
    from datetime import UTC, datetime, timedelta, timezone

    from sync.protocol import event_id, summary_id

    utc = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    cet = utc.astimezone(timezone(timedelta(hours=1)))
    assert summary_id("gw", "m1", utc) == summary_id("gw", "m1", cet)
    assert event_id("gw", "m1", utc, "alarm") == event_id("gw", "m1", cet, "alarm")


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_shows_at_once_even_with_nothing_to_send(store, central, status):
    """Issue 22 item 9: with an empty outbox a round never asked central, so a revoked token looked synced."""
    central.desired = (status, {"error": {"code": "unauthorized", "message": "unknown or revoked gateway token"}})
    sync = client(store, central.url)
    result = sync.sync_once()
    assert result.outcome is Outcome.REFUSED and result.retry_after >= 600
    assert sync.last_success is None and sync.last_error == f"{status}: unknown or revoked gateway token"
    assert central.batches == []


def test_the_token_check_runs_every_round_and_is_conditional(store, central):
    records(store, n_events=1)
    sync = client(store, central.url)
    assert sync.sync_once().outcome is Outcome.SYNCED
    assert sync.sync_once().outcome is Outcome.SYNCED  # nothing to send: still checked
    (first_path, first), (_, second) = central.checks
    assert first_path == "/api/v1/gateways/gw-1/desired" and first["Authorization"] == f"Bearer {TOKEN}"
    assert "If-None-Match" not in first and second["If-None-Match"] == Central.ETAG  # answered 304
    assert "Content-Encoding" not in first  # a GET without a body
    central.desired = (401, {"error": {"code": "unauthorized", "message": "revoked"}})
    assert sync.sync_once().outcome is Outcome.REFUSED and sync.last_error == "401: revoked"


def test_central_without_the_desired_route_still_syncs(store, central):
    records(store, n_events=1)
    central.desired = (404, {"error": {"code": "not_found", "message": "Not Found"}})
    assert client(store, central.url).sync_once().outcome is Outcome.SYNCED and store.pending(10) == []


def test_central_error_text_is_escaped_before_it_reaches_a_terminal(store, central):
    central.desired = (403, {"error": {"code": "forbidden", "message": "no\x1b]0;owned\x07 entry"}})
    sync = client(store, central.url)
    sync.sync_once()
    assert sync.last_error == "403: no\\x1b]0;owned\\x07 entry"

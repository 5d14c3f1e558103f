"""Hostile clients against `pdm-central serve` as a process on the real PostgreSQL (issue 22): what an unauthenticated
client can cost central (memory, guesses), measured on the process itself."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import requests

from central import guard
from sync.protocol import MAX_DROPPED_KINDS
from testkit import batches
from testkit.central import OPS_TOKEN
from tests.central.support import OPS, Server, bearer

MIB = 2**20
HOSTILE_BODY = 256 * MIB  # the 300 MB body grew central from 68 to 681 MB
MEMORY_BOUND = 64 * MIB  # generous: the fix keeps it to a few KB


@pytest.fixture
def central(central_url, tmp_path):
    server = Server.central(central_url, tmp_path / "central.log")
    yield server
    server.terminate()


def rss(server: Server) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def connect(server: Server) -> socket.socket:
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def status_of(sock: socket.socket) -> int | None:
    """The status code of the answer on `sock`, None when the server reset the connection instead."""
    try:
        head = sock.recv(4096)
    except (ConnectionResetError, TimeoutError):
        return None
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None


LOGIN_HEAD = ("POST /login HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n"
              "Content-Type: application/x-www-form-urlencoded\r\n")
# FastAPI reads a route's JSON body before its dependencies run: the ops credential was checked after all of it.
ALARM_HEAD = "POST /api/v1/alarms/1/comment HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("head", [LOGIN_HEAD, ALARM_HEAD], ids=["login", "alarm-action"])
def test_a_huge_body_is_refused_without_growing_central(central, head):
    """Issue 22 item 3: /login read the whole body before its 4 KB check, and an alarm action's body was read whole
    before the ops credential was asked for. A declared Content-Length over the limit is answered 413 before any of
    the body is sent; a chunked body (no length) is read only up to the limit."""
    host = central.base.removeprefix("http://")
    with connect(central) as sock:
        sock.sendall((head + "Content-Length: {n}\r\n\r\n").format(host=host, n=HOSTILE_BODY).encode())
        assert status_of(sock) == 413  # nothing of the body sent: the length alone decided

    before = rss(central)
    chunk = b"%x\r\n" % MIB + b"t" * MIB + b"\r\n"
    with connect(central) as sock:
        sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").format(host=host).encode() + b"6\r\ntoken=\r\n")
        try:
            for _ in range(HOSTILE_BODY // MIB):
                sock.sendall(chunk)
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # central stopped reading: what the fix does
        answer = status_of(sock)
    assert answer in (413, None)
    grown = rss(central) - before
    assert grown < MEMORY_BOUND, f"central grew by {grown / MIB:.0f} MiB for one unauthenticated request"
    assert requests.get(central.base + "/healthz", timeout=5).status_code == 200


def test_ops_token_guesses_are_limited_and_logged_once(central):
    """Issue 22 item 9: the ops bearer took ~1,500 guesses a second. After MAX_FAILURES refusals an address gets
    429 with Retry-After, the right token included; the server log has one warning for the run, never a token."""
    with requests.Session() as http:
        answers = [http.get(central.base + "/api/v1/fleet", headers=bearer(f"guess-{i:04d}"), timeout=5).status_code
                   for i in range(guard.MAX_FAILURES + 20)]
        right = http.get(central.base + "/api/v1/fleet", headers=bearer(OPS_TOKEN), timeout=5)
    assert answers[:guard.MAX_FAILURES] == [401] * guard.MAX_FAILURES
    assert set(answers[guard.MAX_FAILURES:]) == {429}
    assert right.status_code == 429 and int(right.headers["retry-after"]) >= 1
    assert right.json()["error"]["code"] == "too_many_requests"
    log = central.log.read_text()
    warnings = [json.loads(line) for line in log.splitlines() if "refused ops token" in line]
    assert len(warnings) == 1 and warnings[0]["level"].lower().startswith("warn")
    assert "127.0.0.1" in warnings[0]["message"]
    assert "guess-" not in log and OPS_TOKEN not in log


def test_a_gateway_cannot_bloat_the_fleet_with_dropped_kinds(client, gateway):
    """Issue 22 item 9: thousands of `gateway.dropped` keys were stored and served by /api/v1/fleet to everyone."""
    name, token = gateway
    status = {"buffer_pending": 0, "dropped_total": 5000, "uptime_s": 1.0}
    bloated = batches.batch(name, gateway={**status, "dropped": {f"kind-{i}": 1 for i in range(5000)}})
    refused = client.post("/api/v1/ingest", json=bloated, headers=bearer(token))
    assert refused.status_code == 422 and refused.json()["error"]["details"][0]["loc"] == ["gateway", "dropped"]
    fine = {f"kind-{i}": 1 for i in range(MAX_DROPPED_KINDS)}
    assert client.post("/api/v1/ingest", json=batches.batch(name, gateway={**status, "dropped": fine}),
                       headers=bearer(token)).status_code == 200
    fleet = {g["name"]: g for g in client.get("/api/v1/fleet", headers=OPS).json()["gateways"]}
    assert len(fleet[name]["status"]["dropped"]) == MAX_DROPPED_KINDS

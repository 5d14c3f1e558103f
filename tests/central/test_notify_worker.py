"""The worker running as in production (its own task, the real clock): a burst of ingests with alarms, faster than its
gathering window, all reaches the receiver, each transition once. The webhook's HTTP: a receiver that closes an idle
keep-alive connection does not cost a delivery its first attempt; https trusts the CA bundle requests would."""

from __future__ import annotations

import base64
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from central.app import create_app
from central.notify import channels
from central.notify.config import Webhook
from testkit import batches
from testkit.batches import event
from testkit.net import LOCALHOST
from tests.central.notify_support import SECRET, self_signed
from tests.central.support import OPS, bearer, make_settings
from tests.central.test_notify import DELIVERIES, INGEST, central, receivers, route, secret_file, webhook

__all__ = ["central", "receivers", "secret_file"]  # fixtures


def test_a_burst_of_alarms_within_the_gathering_window_all_arrive_each_once(central_url, tmp_path, secret_file,
                                                                            receivers, gateways):
    name, token = gateways.add()
    receiver = receivers()
    hook, burst = f"hook-{name}", f"burst-{name}"  # not another test's: the database is shared
    config = tmp_path / "notify.toml"
    config.write_text(webhook(hook, receiver, secret_file) + route(burst, name, [hook], digest_after=1000))
    ingests, per_ingest = 12, 3  # more deliveries than a round's batch, held by no digest
    with TestClient(create_app(make_settings(central_url, notify_config=config))) as client:
        for i in range(ingests):
            events = [batches.event(name, f"m-{i:02d}-{j}", i, to_state="alarm") for j in range(per_ingest)]
            response = client.post(INGEST, json=batches.batch(name, summaries=[], events=events), headers=bearer(token))
            assert response.status_code == 200, response.text
        deadline = time.monotonic() + 30
        mine = deliveries(client, burst)
        while time.monotonic() < deadline and not all_delivered(mine, ingests * per_ingest):
            time.sleep(0.05)
            mine = deliveries(client, burst)
    expected = sorted(("opened", f"m-{i:02d}-{j}", burst) for i in range(ingests) for j in range(per_ingest))
    assert receiver.transitions() == expected
    assert len(receiver.requests) == ingests * per_ingest  # none sent twice
    assert all(valid for _, _, valid in receiver.requests)
    assert len(mine) == ingests * per_ingest
    assert {(d["state"], d["attempts"]) for d in mine} == {("delivered", 1)}


def deliveries(client: TestClient, route: str) -> list[dict]:
    found = client.get(DELIVERIES, params={"limit": 1000}, headers=OPS).json()["deliveries"]
    return [d for d in found if d["route"] == route]


def all_delivered(deliveries: list[dict], count: int) -> bool:
    """The receiver has them and the worker has marked them (after the receiver's answers)."""
    return len(deliveries) == count and all(d["state"] == "delivered" for d in deliveries)


class ClosesIdle:
    """A keep-alive (HTTP/1.1) receiver that closes each connection once it has answered, without saying so; over
    TLS with `cert` (and key.pem beside it)."""

    def __init__(self, cert: Path | None = None) -> None:
        self.delivered: list[str] = []
        self.proxy_logins: list[str | None] = []
        self.closed = threading.Semaphore(0)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.delivered.append(self.headers["X-PDM-Delivery"])
                receiver.proxy_logins.append(self.headers.get("Proxy-Authorization"))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def shutdown_request(self, request) -> None:  # type: ignore[no-untyped-def]
                super().shutdown_request(request)
                receiver.closed.release()

        self.server = Server((LOCALHOST, 0), Handler)
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, cert.parent / "key.pem")
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if cert else 'http'}://{LOCALHOST}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hook_to(url: str, secret_file: Path) -> Webhook:
    return Webhook.model_validate({"type": "webhook", "url": url, "secret_file": secret_file, "timeout_s": 2,
                                   "secret": SECRET})


def test_a_keep_alive_connection_the_receiver_closed_is_not_reused(secret_file):
    receiver = ClosesIdle()
    hook = hook_to(receiver.url, secret_file)
    try:
        for delivery in ("first", "second", "third"):
            channels.send(hook, delivery, {"delivery_id": delivery, "transition": "opened"})
            assert receiver.closed.acquire(timeout=10)
    finally:
        receiver.close()
    assert receiver.delivered == ["first", "second", "third"]


def test_https_trusts_the_ca_bundle_requests_would_and_refuses_another(tmp_path, secret_file, monkeypatch):
    receiver = ClosesIdle(self_signed(tmp_path))
    hook = hook_to(receiver.url, secret_file)
    try:
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        with pytest.raises(channels.DeliveryError, match="TLS failed"):  # certifi's bundle: not this certificate
            channels.send(hook, "untrusted", {"delivery_id": "untrusted"})
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "cert.pem"))
        channels.send(hook, "trusted", {"delivery_id": "trusted"})
    finally:
        receiver.close()
    assert receiver.delivered == ["trusted"]


def test_a_receiver_behind_an_environment_proxy_is_reached_through_it_with_its_login(secret_file, monkeypatch):
    proxy = ClosesIdle()  # takes the absolute-URI request a proxy gets
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url.removesuffix("/hook").replace("://", "://pdm:s%40cret@"))
    try:
        channels.send(hook_to("http://hooks.example.invalid/pdm-proxied", secret_file), "via-proxy",
                      {"delivery_id": "via-proxy"})
    finally:
        proxy.close()
    assert proxy.delivered == ["via-proxy"]
    assert proxy.proxy_logins == ["Basic " + base64.b64encode(b"pdm:s@cret").decode()]


def test_every_delivery_of_a_round_is_attempted_at_once(central, receivers, secret_file, gateways, monkeypatch):
    """A receiver that never answers in time costs a round one timeout, not one for every few deliveries: on the
    event loop's default executor (6 threads on 2 cores) a round of 20 took 4 timeouts, past the lease, after which
    another gunicorn worker could claim and send the same rows again."""
    send, lock, at_once = channels.send, threading.Lock(), {"now": 0, "most": 0}

    def counted(*args) -> None:
        with lock:
            at_once["now"] += 1
            at_once["most"] = max(at_once["most"], at_once["now"])
        try:
            send(*args)
        finally:
            with lock:
                at_once["now"] -= 1

    monkeypatch.setattr(channels, "send", counted)
    gateway = gateways.add()
    receiver = receivers(slow=1_000, slow_s=2.0)
    hook = f"hook-{gateway[0]}"  # routes and channels are counted by name for digests: this test's own
    c = central(webhook(hook, receiver, secret_file, timeout_s=0.5) + route(f"r-{gateway[0]}", gateway[0], [hook]))
    c.send(gateway, [event(gateway[0], f"m-{i:02d}", to_state="alarm") for i in range(20)])
    c.deliver()
    pending = [d for d in c.deliveries(state="pending") if d["channel"] == hook]
    assert len(pending) == 20 and {d["attempts"] for d in pending} == {1}
    assert at_once["most"] == 20

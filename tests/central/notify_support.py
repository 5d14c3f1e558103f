"""Real receivers on loopback for the notification tests: a webhook receiver that checks the signature and can
answer 500, answer late or hang up mid-body for its first requests; an SMTP server (aiosmtpd) with STARTTLS."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
import time
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from testkit.net import LOCALHOST

SECRET = "whsec-5d1f0c7e9a2b4c6d8e0f1a3b5c7d9e1f"


class Backlogged(ThreadingHTTPServer):
    """As a webhook receiver in production listens (nginx: 511): http.server's backlog of 5 drops the connections of a
    round's concurrent deliveries beyond it, and their first attempts time out on a SYN retransmitted too late."""

    request_queue_size = 128


class Receiver:
    """A webhook receiver. `fail`, `slow`, `cut`: how many of the first requests answer 500, answer after
    `slow_s` (longer than the channel's timeout), or are hung up on halfway through the body."""

    def __init__(self, secret: str = SECRET, fail: int = 0, slow: int = 0, slow_s: float = 2.0, cut: int = 0,
                 hold_s: float = 0.0) -> None:
        self.secret, self.fail, self.slow, self.slow_s, self.cut, self.hold_s = secret, fail, slow, slow_s, cut, hold_s
        self.requests: list[tuple[str, dict, bool]] = []  # (delivery id, body, signature valid) of whole bodies
        self.answered: dict[str, dict] = {}  # delivery id -> body, for the requests answered 200
        self.seen = 0
        self.lock = threading.Lock()
        self.first_request = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                receiver.handle(self)

        self.server = Backlogged((LOCALHOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{LOCALHOST}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self.lock:
            n = self.seen
            self.seen += 1
        length = int(handler.headers["Content-Length"])
        if n < self.cut:
            handler.rfile.read(length // 2)
            handler.close_connection = True
            handler.connection.close()
            return
        raw = handler.rfile.read(length)
        delivery = handler.headers["X-PDM-Delivery"]
        expected = "sha256=" + hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()
        valid = hmac.compare_digest(expected, handler.headers.get("X-PDM-Signature", ""))
        body = json.loads(raw)
        with self.lock:
            self.requests.append((delivery, body, valid))
        self.first_request.set()
        if self.hold_s:
            time.sleep(self.hold_s)
        if n < self.cut + self.fail:
            handler.send_response(500)
            handler.end_headers()
            return
        if n < self.cut + self.fail + self.slow:
            time.sleep(self.slow_s)
        with self.lock:
            self.answered.setdefault(delivery, body)  # the receiver's dedupe: by delivery id
        handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def transitions(self) -> list[tuple]:
        """What the receiver acted on, once per delivery id: (transition, machine, route)."""
        with self.lock:
            return sorted((b["transition"], b.get("episode", {}).get("machine_id"), b["route"])
                          for b in self.answered.values())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def self_signed(folder: Path) -> Path:
    """A certificate for 127.0.0.1 and localhost that is its own CA (folder/cert.pem), and its key (key.pem)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"), "-days", "1",
                    "-subj", "/CN=localhost", "-addext", f"subjectAltName=DNS:localhost,IP:{LOCALHOST}"],
                   check=True, capture_output=True)
    return folder / "cert.pem"


class Mailbox:
    """aiosmtpd's handler: the messages received, parsed."""

    def __init__(self) -> None:
        self.messages: list = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult

        self.logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"smtp-pass-123")

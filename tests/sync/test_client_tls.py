"""central.ca_file is what the sync client trusts, whatever the environment says: requests lets REQUESTS_CA_BUNDLE
and CURL_CA_BUNDLE override a session's CA bundle, which silently ignored a gateway's private CA (found syncing
through the Compose stack's nginx, tests/deploy/test_compose.py). A real TLS server with a self-signed certificate."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync.client import SyncClient
from sync.config import CentralConfig


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}", cert
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_the_configured_ca_file_wins_over_a_ca_bundle_in_the_environment(
        tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str) -> None:
    url, cert = tls_server
    other = tmp_path / "other-ca.pem"  # a bundle that does not hold the server's certificate
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other",
                    "-keyout", str(tmp_path / "other.key"), "-out", str(other)], check=True, capture_output=True)
    monkeypatch.setenv(variable, str(other))
    config = CentralConfig(url=url, token="a-gateway-token", ca_file=cert)
    client = SyncClient(config, "gw-tls", "0.1.0", outbox=None, gateway_status=lambda: None)  # type: ignore[arg-type]
    try:
        assert client.fetch("/bundle") == b"ok"
    finally:
        client.close()

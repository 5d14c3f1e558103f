"""The webhook's HTTP exchange, on http.client with kept-alive connections of our own.

requests cost about 0.5 ms of CPU per POST here (its environment, netrc and proxy lookups at every request), urllib3
0.25 ms, http.client 0.14 ms; the notifier pays it for every delivery. Kept as requests did it for a webhook: the CA
bundle requests would use (REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE, else certifi's), the environment's proxy for the
URL, a user and password in the URL as basic auth, no redirect followed, no retry here (the outbox retries), and a
kept-alive connection the receiver has closed is not reused (checked when it is taken, as urllib3 does).
"""

from __future__ import annotations

import base64
import functools
import http.client
import os
import select
import socket
import ssl
import threading
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import certifi

POOL_SIZE = 32  # kept connections per receiver: at least the worker's batch, so concurrent sends keep theirs


class Broken(Exception):
    """The exchange failed; the message is DeliveryError's one line."""


BEFORE = "cannot connect, or the connection broke before the answer"


@dataclass
class _Receiver:
    """Where one URL's requests go (the receiver, or the proxy in front of it), and its idle connections."""

    host: str
    port: int
    target: str  # the request line's target: the path, or the whole URL through a plain-http proxy
    headers: dict[str, str]  # basic auth from the URL
    tls: ssl.SSLContext | None
    tunnel: tuple[str, int] | None  # https through a proxy: CONNECT to this
    idle: list[http.client.HTTPConnection] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def connection(self, timeout_s: float) -> http.client.HTTPConnection:
        with self.lock:
            while self.idle:
                conn = self.idle.pop()
                if conn.sock is not None and not _readable(conn.sock):  # readable while idle: closed, or garbage
                    conn.sock.settimeout(timeout_s)
                    return conn
                conn.close()
        if self.tls is not None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout_s, context=self.tls)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        if self.tunnel is not None:
            conn.set_tunnel(*self.tunnel)
        return conn

    def keep(self, conn: http.client.HTTPConnection) -> None:
        with self.lock:
            if len(self.idle) < POOL_SIZE:
                self.idle.append(conn)
                return
        conn.close()


def post(url: str, raw: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST `raw` to `url`; the answer's status. Broken when there is no answer."""
    receiver = _receiver(url, _bundle())
    conn = receiver.connection(timeout_s)
    answered = False
    try:
        conn.request("POST", receiver.target, body=raw, headers={**headers, **receiver.headers})
        response = conn.getresponse()
        answered = True
        response.read()
    except ssl.SSLError:  # before OSError: it is one
        conn.close()
        raise Broken("TLS failed (the receiver's certificate is not trusted, or no common protocol)") from None
    except TimeoutError:
        conn.close()
        raise Broken(f"no answer within {timeout_s:g} s") from None
    except (OSError, http.client.HTTPException):
        conn.close()
        raise Broken("the connection broke during the answer" if answered else BEFORE) from None
    if response.will_close:
        conn.close()
    else:
        receiver.keep(conn)
    return response.status


def _readable(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _bundle() -> str:
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()


@functools.lru_cache(maxsize=64)
def _receiver(url: str, bundle: str) -> _Receiver:
    """One per URL and CA bundle (a bundle takes far longer to load than a request), behind the environment's proxy
    for the URL when there is one."""
    parts = urlsplit(url)
    host, https = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {}
    if parts.username is not None:
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(login).decode()
    tls = None
    if https:
        folder, file = (bundle, None) if os.path.isdir(bundle) else (None, bundle)
        tls = ssl.create_default_context(cafile=file, capath=folder)
    proxy = urllib.request.getproxies().get(parts.scheme or "http")
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        via_port = via.port or (443 if via.scheme == "https" else 80)
        if https:  # CONNECT through the proxy, TLS with the receiver inside the tunnel
            return _Receiver(via.hostname or "", via_port, path, headers, tls, (host, port))
        netloc = host if parts.port is None else f"{host}:{port}"
        return _Receiver(via.hostname or "", via_port, f"http://{netloc}{path}", headers, None, None)
    return _Receiver(host, port, path, headers, tls, None)

"""The webhook's HTTP exchange: http.client on one keep-alive connection per receiver and worker thread.

requests cost about four times the CPU per POST (its per-request environment, netrc, proxy and adapter lookups),
and the worker pays it for every delivery, in the process that also takes the ingest. This does what requests did
for a webhook: the same trusted CAs (REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE, else certifi's bundle), no redirect
followed, an idle connection the receiver has closed is not reused; a URL that an environment proxy applies to, that
carries a user and password or is not ASCII still goes through requests, which knows proxies, auth and quoting.
"""

from __future__ import annotations

import functools
import http.client
import os
import select
import socket
import ssl
import threading
from urllib.parse import urlsplit

import requests
import requests.utils

Target = tuple[str, str, int]  # scheme, host, port


class Broken(Exception):
    """The exchange failed; the message is DeliveryError's one line."""


def post(url: str, raw: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST `raw` to `url`; the answer's status. Broken when there is no answer."""
    if not _direct(url):
        return _via_requests(url, raw, headers, timeout_s)
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    target = _target(url)
    try:
        return _exchange(_connection(target, timeout_s), path, raw, headers)
    except Broken:
        _forget(target)  # the next attempt starts afresh (a new connection, the CA bundle of the moment)
        raise


def _exchange(conn: http.client.HTTPConnection, path: str, raw: bytes, headers: dict[str, str]) -> int:
    try:
        conn.request("POST", path, body=raw, headers=headers)
        response = conn.getresponse()
    except TimeoutError:
        raise Broken(f"no answer within {conn.timeout:g} s") from None
    except ssl.SSLError:
        raise Broken("TLS failed (the receiver's certificate is not trusted, or no common protocol)") from None
    except (OSError, http.client.HTTPException):
        raise Broken("cannot connect, or the connection broke before the answer") from None
    try:
        response.read()  # the whole answer, or the connection cannot carry the next request
    except TimeoutError:
        raise Broken(f"no answer within {conn.timeout:g} s") from None
    except (OSError, http.client.HTTPException):
        raise Broken("the connection broke during the answer") from None
    return response.status


@functools.lru_cache(maxsize=64)
def _direct(url: str) -> bool:
    parts = urlsplit(url)
    return url.isascii() and parts.username is None and not requests.utils.get_environ_proxies(url)


@functools.lru_cache(maxsize=64)
def _target(url: str) -> Target:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


_local = threading.local()


def _connection(target: Target, timeout_s: float) -> http.client.HTTPConnection:
    """This thread's connection to `target`, a new one when the receiver has closed the kept one."""
    connections: dict[Target, http.client.HTTPConnection] = _local.__dict__.setdefault("connections", {})
    conn = connections.get(target)
    if conn is not None and conn.sock is not None and _closed_by_peer(conn.sock):
        conn.close()  # http.client opens it again at the next request
    if conn is None:
        scheme, host, port = target
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=_tls())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        connections[target] = conn
    conn.timeout = timeout_s
    if conn.sock is not None:
        conn.sock.settimeout(timeout_s)
    return conn


def _forget(target: Target) -> None:
    conn = _local.__dict__.get("connections", {}).pop(target, None)
    if conn is not None:
        conn.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle keep-alive connection that is readable has been closed (or sent garbage): not to be reused."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


@functools.lru_cache(maxsize=4)
def _tls_for(bundle: str) -> ssl.SSLContext:
    if os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


def _tls() -> ssl.SSLContext:
    """One context per CA bundle (loading one is far dearer than a request), the bundle requests would use."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or requests.utils.DEFAULT_CA_BUNDLE_PATH
    return _tls_for(bundle)


def _via_requests(url: str, raw: bytes, headers: dict[str, str], timeout_s: float) -> int:
    try:
        response = _session().post(url, data=raw, headers=headers, timeout=timeout_s, allow_redirects=False)
    except requests.Timeout:
        raise Broken(f"no answer within {timeout_s:g} s") from None
    except requests.exceptions.SSLError:
        raise Broken("TLS failed (the receiver's certificate is not trusted, or no common protocol)") from None
    except requests.exceptions.ChunkedEncodingError:
        raise Broken("the connection broke during the answer") from None
    except requests.ConnectionError:
        raise Broken("cannot connect, or the connection broke before the answer") from None
    except requests.RequestException:
        raise Broken("the request failed") from None
    return response.status_code


def _session() -> requests.Session:
    """One session per worker thread: connections to a receiver are kept alive between deliveries."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session

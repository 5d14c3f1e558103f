"""The webhook's HTTP exchange, on urllib3 (the transport under requests) without requests' per-request work.

requests cost about 0.5 ms of CPU per POST here (its environment, netrc and proxy lookups at every request), urllib3
0.19 ms; the worker pays it for every delivery. Kept as requests did it for a webhook: the CA bundle requests would
use (REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE, else certifi's), the environment's proxy for the URL with the login in
the proxy's URL if any, a user and password in the URL as basic auth, no redirect followed, no retry here (the outbox
retries), and a kept-alive connection the receiver has closed is not reused (urllib3 checks at checkout).
"""

from __future__ import annotations

import functools
import os
import urllib.parse
import urllib.request

import certifi
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

POOL_SIZE = 32  # kept connections per receiver: at least the worker's batch, so concurrent sends keep theirs


class Broken(Exception):
    """The exchange failed; the message is DeliveryError's one line."""


def post(url: str, raw: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST `raw` to `url`; the answer's status. Broken when there is no answer."""
    auth = urllib3.util.parse_url(url).auth
    if auth:
        headers = {**headers, **urllib3.util.make_headers(basic_auth=auth)}
    try:
        response = _pool(url, _bundle()).request("POST", url, body=raw, headers=headers, redirect=False,
                                                 retries=False, timeout=urllib3.Timeout(timeout_s))
    except NewConnectionError:  # a ConnectTimeoutError too, to urllib3: tested first
        raise Broken("cannot connect, or the connection broke before the answer") from None
    except (ConnectTimeoutError, ReadTimeoutError):
        raise Broken(f"no answer within {timeout_s:g} s") from None
    except SSLError:
        raise Broken("TLS failed (the receiver's certificate is not trusted, or no common protocol)") from None
    except ProtocolError as exc:  # "Connection aborted." before an answer, "Connection broken: ..." while reading one
        during = str(exc.args[0] if exc.args else "").startswith("Connection broken")
        raise Broken("the connection broke during the answer" if during else
                     "cannot connect, or the connection broke before the answer") from None
    except HTTPError:
        raise Broken("cannot connect, or the connection broke before the answer") from None
    return response.status


def _bundle() -> str:
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()


@functools.lru_cache(maxsize=64)
def _pool(url: str, bundle: str) -> urllib3.PoolManager:
    """One pool per URL and CA bundle (a bundle takes far longer to load than a request), behind the environment's
    proxy for the URL when there is one."""
    folder, file = (bundle, None) if os.path.isdir(bundle) else (None, bundle)
    parts = urllib3.util.parse_url(url)
    proxy = urllib.request.getproxies().get(parts.scheme or "http")
    if proxy and not urllib.request.proxy_bypass(parts.host or ""):
        login = urllib3.util.parse_url(proxy).auth  # urllib3 does not send it by itself
        headers = urllib3.util.make_headers(proxy_basic_auth=urllib.parse.unquote(login)) if login else None
        return urllib3.ProxyManager(proxy, maxsize=POOL_SIZE, ca_certs=file, ca_cert_dir=folder, proxy_headers=headers)
    return urllib3.PoolManager(maxsize=POOL_SIZE, ca_certs=file, ca_cert_dir=folder)

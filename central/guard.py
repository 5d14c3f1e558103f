"""Refused credentials at central: limited and logged per client address (web.throttle.FailedAuth), one throttle per
kind of credential: the ops bearer token, the dashboard's sign-in form, the gateway tokens of the ingest and the
desired-state routes.

The client address is the one the app sees: with PDM_CENTRAL_TRUSTED_PROXIES set, ProxyHeadersMiddleware has
already replaced it by X-Forwarded-For's when, and only when, the request came from a trusted proxy; so a client
cannot dodge its limit, or put another on the limit, with a forged header.

A refusal is logged at warning level by web.throttle (address and kind, never the credential), repeats collapsed
into one line per address and window. After `MAX_FAILURES` refusals in `WINDOW_S` seconds an address is answered
429 with Retry-After, its credentials not even checked, until the window ends: about 10 guesses a minute instead of
the ~1,500 a second measured before (issue 22).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from central.errors import ApiError
from web.throttle import FailedAuth

MAX_FAILURES = 10
WINDOW_S = 60.0


def _throttle(what: str) -> FailedAuth:
    return FailedAuth(what, max_failures=MAX_FAILURES, window_s=WINDOW_S)


@dataclass
class Guards:
    ops: FailedAuth = field(default_factory=lambda: _throttle("ops token"))
    login: FailedAuth = field(default_factory=lambda: _throttle("dashboard sign-in"))
    gateway: FailedAuth = field(default_factory=lambda: _throttle("gateway token"))


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def too_many(seconds: int) -> ApiError:
    return ApiError(429, "too_many_requests", f"too many refused credentials from this address; retry in {seconds} s",
                    headers={"Retry-After": str(seconds)})


def check(throttle: FailedAuth, request: Request) -> None:
    """429 (ApiError) when the client's address is over its limit of refused credentials."""
    seconds = throttle.retry_after(client_address(request))
    if seconds is not None:
        raise too_many(seconds)


def refused(throttle: FailedAuth, request: Request) -> None:
    throttle.failed(client_address(request))

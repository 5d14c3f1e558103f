"""The status API's outermost layer and its errors: security headers on every response, the Host check without a
token, the bearer token with a limit on wrong ones, and JSON errors (`ApiError`, `error`)."""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sync.config import is_loopback
from web.http import ErrorResponse, error_body, with_security_headers
from web.throttle import FailedAuth

log = logging.getLogger("agent.status")

RETRY_AFTER = {"Retry-After": {"description": "seconds until this address may present a token again",
                               "schema": {"type": "integer", "minimum": 1}}}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: list[Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


def error(status: int, code: str, message: str, details: list[Any] | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, **({"headers": RETRY_AFTER} if status == 429 else {})}
            for status in statuses}


# The guard answers any route with 400 (a Host not this machine's, without a token), 401 and 429 (with a token,
# except /healthz and /) or 500: each route documents those it can give.
ERRORS = documented(400, 401, 404, 422, 429, 500, 503)


class Guard:
    """Security headers on every response; the Host check without a token; the bearer token, with at most
    `FailedAuth`'s few refused tokens a minute per client address (then 429 with Retry-After, and warnings naming
    the address, never the token); JSON 500s. The agent's own rather than web.http.SecurityHeaders: it answers the
    refusals and unhandled exceptions itself, with the headers.

    It sits inside Starlette's ServerErrorMiddleware, which would answer an unhandled exception with a plain-text
    500 without our headers: so an exception is answered here, and never reaches it."""

    def __init__(self, app: ASGIApp, token: str | None, bind_host: str, cors: bool) -> None:
        self.app = app
        self._token_digest = hashlib.sha256(token.encode()).digest() if token else None
        self.failed_auth = FailedAuth("status token")
        self._hosts = {"localhost", "127.0.0.1", "::1", bind_host.lower()}
        self._cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = with_security_headers(list(message.get("headers", [])))
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("status API: %s %s failed", scope.get("method"), scope.get("path"))
            if started:  # the response is half sent: nothing better to do than to drop the connection
                raise
            response = error(500, "internal", "internal error; the agent's log has the details")
            await response(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if self._token_digest is None:
            host = hostname(headers.get("host", ""))
            if host not in self._hosts and not is_loopback(host):
                return error(400, "bad_host", f"Host {host!r} is not this machine's loopback address: without "
                             "status.token the status API answers on loopback only; set status.token to serve "
                             "other names")
            return None
        if scope["path"] in ("/healthz", "/"):
            return None
        if self._cors and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return None  # a CORS preflight carries no credentials; CORSMiddleware answers it
        return self._token_refusal(scope, headers, self._token_digest)

    def _token_refusal(self, scope: Scope, headers: dict[str, str], digest: bytes) -> JSONResponse | None:
        address = scope["client"][0] if scope.get("client") else "an unknown address"
        wait = self.failed_auth.retry_after(address)
        if wait is not None:
            return error(429, "too_many_requests", f"too many wrong tokens from {address}; try again in {wait} s",
                         headers={"Retry-After": str(wait)})
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if not given.strip():  # no credential at all: nothing guessed, nothing counted
            return error(401, "unauthorized", "this endpoint needs Authorization: Bearer <status.token>",
                         headers={"WWW-Authenticate": "Bearer"})
        # Compare digests: constant time, and independent of the length of what was sent.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                hashlib.sha256(given.strip().encode("utf-8", "surrogatepass")).digest(), digest):
            self.failed_auth.failed(address)
            return error(401, "unauthorized", "wrong token" if scheme.lower() == "bearer" else
                         "this endpoint needs Authorization: Bearer <status.token>",
                         headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return None


def hostname(host: str) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1', '[::1]:8080' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host

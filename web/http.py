"""HTTP hardening both servers apply: security headers, the JSON error envelope, CSP by hash for inline pages.

Every error either server answers is `{"error": {"code", "message", "details"?}}` (`error_body`), with the code
for its status from STATUS_CODES unless the route names a more precise one. Every response carries
SECURITY_HEADERS unless the route set that header itself (a page sets its own Content-Security-Policy).
A page is one self-contained HTML document with exactly one inline <script> and one inline <style>, allowed by
their sha256 (`load_page`, `Page.csp`): nothing else may run, load or be fetched except from the same origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
HSTS = (b"strict-transport-security", b"max-age=31536000")
SMALL_BODY_BYTES = 64 * 1024  # any request body but central's ingest: a sign-in form, an alarm action

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
                422: "invalid_request", 429: "too_many_requests", 500: "internal", 503: "unavailable"}


class ErrorDetail(BaseModel):
    loc: list[str | int]  # where in the request: ["query", "limit"], ["summaries", 3, "window_end"]
    msg: str
    type: str


class ErrorBody(BaseModel):
    code: str  # stable, for programs: unauthorized, invalid_request, too_many_requests, database_unavailable...
    message: str  # for people
    details: list[ErrorDetail | dict[str, Any]] | None = None  # validation problems, when there are some


class ErrorResponse(BaseModel):
    """What every error answers; the model the OpenAPI documents give every 4xx and 5xx."""

    error: ErrorBody


def error_body(code: str, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    """The envelope of ErrorResponse, `details` only when given (and passed as is: no None inside it dropped)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def with_security_headers(headers: list[tuple[bytes, bytes]], extra: Sequence[tuple[bytes, bytes]] = ()
                          ) -> list[tuple[bytes, bytes]]:
    """`headers` (an ASGI response start's) plus every security header it does not set itself."""
    present = {name.lower() for name, _ in headers}
    return [*headers, *(h for h in [*SECURITY_HEADERS, *extra] if h[0] not in present)]


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every HTTP response, and HSTS when asked for and the request came over
    https (behind a proxy: once the proxy headers middleware has set the scheme)."""

    def __init__(self, app: ASGIApp, hsts: bool = False) -> None:
        self.app, self.hsts = app, hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = [HSTS] if self.hsts and scope.get("scheme") == "https" else []

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = with_security_headers(list(message.get("headers", [])), extra)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the route sees it. A Content-Length
    over the limit is refused unread; a body without one is read only up to the limit (then handed on whole).
    FastAPI reads a route's body before its dependencies run, the credential check included: without this, one
    unauthenticated request could grow the server by its body's size (issue 22 item 3). `exempt`: the paths that
    stream and cap their own body (central's ingest)."""

    def __init__(self, app: ASGIApp, limit: int = SMALL_BODY_BYTES, exempt: frozenset[str] = frozenset()) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, given = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal given
            if given:
                return await receive()  # after the body: the disconnect, when it comes
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = JSONResponse(error_body("payload_too_large", f"the request body exceeds {self.limit:,} bytes"),
                              status_code=413, headers={"Connection": "close"})
        await answer(scope, receive, send)


def csp_hash(text: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


def inline_blocks(html: str, name: str) -> dict[str, str]:
    """The page's one inline <script> and one inline <style> by tag; RuntimeError naming the page otherwise."""
    blocks = {}
    for tag in ("script", "style"):
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        if len(found) != 1:
            raise RuntimeError(f"{name} must hold exactly one inline <{tag}>, not {len(found)}")
        blocks[tag] = found[0]
    return blocks


def page_csp(script: str | None, style: str, *, form_action: str = "'none'") -> str:
    """The Content-Security-Policy of a page whose inline `script` (None: no script may run) and `style` are
    allowed by hash; it may fetch from its own origin only."""
    scripts = csp_hash(script) if script is not None else "'none'"
    return (f"default-src 'none'; script-src {scripts}; style-src {csp_hash(style)}; connect-src 'self'; "
            f"img-src data:; base-uri 'none'; form-action {form_action}; frame-ancestors 'none'")


@dataclass(frozen=True, slots=True)
class Page:
    """A self-contained HTML page and its two inline blocks."""

    html: bytes
    script: str
    style: str

    def csp(self, *, form_action: str = "'none'") -> str:
        return page_csp(self.script, self.style, form_action=form_action)


def load_page(package: str, resource: str) -> Page:
    """`resource` of `package` (e.g. "central", "static/dashboard.html"); RuntimeError naming the file unless it
    holds exactly one inline <script> and one inline <style>."""
    html = resources.files(package).joinpath(resource).read_text(encoding="utf-8")
    blocks = inline_blocks(html, f"{package}/{resource}")
    return Page(html.encode(), blocks["script"], blocks["style"])

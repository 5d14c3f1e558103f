"""Connection limits for the status API's uvicorn server: a deadline for each request, a cap per address.

uvicorn's own timeout (`timeout_keep_alive`) starts after a response and restarts on every byte received; a
connection that never sends a request, or trickles its request a byte at a time, holds a slot forever, and
`limit_concurrency` counts those slots: about 70 idle connections answered everything else, /healthz included,
with 503. `limited_h11(limits)` is uvicorn's H11Protocol with two more rules:

- a request (head and body, if any: the status API's requests have none) must be complete within
  `request_timeout_s` of the connection opening, or of its first byte once the previous response was sent;
  otherwise the connection is closed;
- one client address holds at most `per_address` connections; a connection beyond is closed as it opens (before
  uvicorn counts it against `limit_concurrency`), so one address cannot starve the others.

Refused connections are logged at warning level, once per address per minute with a count of the repeats
(web/throttle.py); connections closed for want of a request are not (a browser's unused speculative connection
ends that way too).
Everything here runs in the server's event loop thread.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

from web.throttle import FailedAuth


@dataclass
class ConnectionLimits:
    # A browser opens up to 6 connections to a host, Prometheus 1, `pdm-edge status` 1: 16 leaves room for two
    # browsers (or a browser behind the same NAT as the scraper) and still takes 4 addresses to fill uvicorn's
    # `limit_concurrency` of 64 for a request timeout's length.
    per_address: int = 16
    # Browsers open speculative connections they may use a few seconds later; a request is a few hundred bytes,
    # so 10 s is generous on any LAN, and it bounds how long an idle connection holds its slot.
    request_timeout_s: float = 10.0
    open: Counter[str] = field(default_factory=Counter)  # connections per client address, now
    # Only for its collapsed warnings: nothing is throttled by it.
    refusals: FailedAuth = field(default_factory=lambda: FailedAuth(
        "a connection over the per-address cap", max_failures=2**62, max_addresses=1000))


def limited_h11(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's H11Protocol enforcing `limits` (pass as `uvicorn.Config(http=...)`)."""

    class LimitedH11Protocol(H11Protocol):
        _address: str | None = None
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            remote = get_remote_addr(transport)
            address = remote[0] if remote else "an unknown address"
            if limits.open[address] >= limits.per_address:
                limits.refusals.failed(address)
                transport.abort()  # before any request: nothing to answer, and the slot is freed at once
                return
            limits.open[address] += 1
            self._address = address
            self._arm_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timer()
            if self._address is not None:
                limits.open[self._address] -= 1
                if limits.open[self._address] <= 0:
                    del limits.open[self._address]
                self._address = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._address is None:  # refused: aborting, nothing to parse
                return
            super().data_received(data)
            if self._receiving() and not self.transport.is_closing():
                if self._timer is None:  # part of a request, not all of it yet: the clock runs
                    self._arm_timer()
            else:
                self._cancel_timer()

        def _receiving(self) -> bool:
            """A request has not begun (IDLE) or its body is still coming (SEND_BODY)."""
            return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

        def _arm_timer(self) -> None:
            self._timer = self.loop.call_later(limits.request_timeout_s, self._timed_out)

        def _cancel_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _timed_out(self) -> None:
            self._timer = None
            # Not logged: a browser's unused speculative connection ends this way too.
            if self._receiving() and not self.transport.is_closing():
                self.transport.close()

    return LimitedH11Protocol

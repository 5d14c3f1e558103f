"""Failed authentication attempts, limited and logged per client address.

Each server keeps one `FailedAuth` per kind of credential (the status token, the ops token, dashboard sign-in).
Before checking a credential it asks `retry_after(address)`: a number means answer 429 with that Retry-After
and check nothing. After a refusal it calls `failed(address)`. The first refusal from an address is logged at
warning level (address and what was refused, never the credential); repeats within the window are counted and
logged once as a total when the window closes, so a brute-force run is a handful of lines, not thousands.

Memory stays bounded: at most `max_addresses` addresses are tracked; past that the oldest is forgotten.
Thread-safe (the agent's guard runs in the server thread; central's in its event loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("pdm.auth")


@dataclass
class _Window:
    started: float
    failures: int = 0
    logged: int = 0


class FailedAuth:
    def __init__(self, what: str, *, max_failures: int = 10, window_s: float = 60.0, max_addresses: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self.refused_total = 0
        self.throttled_total = 0
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int | None:
        """Seconds the address must wait before trying again, or None when it may try now."""
        with self._lock:
            window = self._current(address, create=False)
            if window is None or window.failures < self.max_failures:
                return None
            self.throttled_total += 1
            return max(1, int(window.started + self.window_s - self._clock()) + 1)

    def failed(self, address: str) -> None:
        """Record a refused credential from `address` (logs the first of each window at warning level)."""
        with self._lock:
            self.refused_total += 1
            window = self._current(address, create=True)
            assert window is not None
            window.failures += 1
            if window.failures == 1:
                window.logged = 1
                log.warning("refused %s from %s", self.what, address)

    def _current(self, address: str, *, create: bool) -> _Window | None:
        now = self._clock()
        window = self._windows.get(address)
        if window is not None and now - window.started >= self.window_s:
            self._close(address, window)
            window = None
        if window is None and create:
            window = self._windows[address] = _Window(started=now)
            while len(self._windows) > self.max_addresses:
                old_address, old = self._windows.popitem(last=False)
                self._report_repeats(old_address, old)
        return window

    def _close(self, address: str, window: _Window) -> None:
        del self._windows[address]
        self._report_repeats(address, window)

    def _report_repeats(self, address: str, window: _Window) -> None:
        repeats = window.failures - window.logged
        if repeats > 0:
            log.warning("refused %s from %s %d more times in %.0f s", self.what, address, repeats, self.window_s)

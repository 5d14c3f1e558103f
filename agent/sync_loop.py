"""The sync thread: runs `SyncClient.sync_once()` rounds until the agent stops, and counts them (`SyncLoop.stats()`).

Who calls it: the agent starts it after the drivers and stops it before them; `stats()` is read from any thread.
A round that raises what it should not (a bug) is logged with its traceback, counted as `internal_errors` and
retried after a pause: the thread never dies of it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from agent.store import StoreError
from drivers.base import Availability
from sync.config import CentralConfig
from sync.outbox import Outcome, Round

if TYPE_CHECKING:
    from sync.client import SyncClient

log = logging.getLogger(__name__)

STORE_RETRY_S = 5.0
INTERNAL_RETRY_S = 30.0


@dataclass(frozen=True)
class SyncStats:
    """Sync to central since the agent started."""

    url: str
    last_success: datetime | None  # when the outbox was last emptied into central
    last_error: str | None  # the latest failure, kept after later successes: compare with last_success
    rounds: Mapping[str, int]  # by Outcome value: synced, retry, refused (every outcome present)
    records_sent: int  # summaries and events central accepted
    internal_errors: int  # rounds that failed on a bug (logged with their traceback)
    actions_error: str | None = None  # why gateway actions are kept back, while they are


class SyncLoop:
    def __init__(self, client: SyncClient, url: str) -> None:
        self._client = client
        self._url = url
        self._central = Availability(f"central {url}", log)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sync", daemon=True)
        self._rounds: Counter[str] = Counter()
        self._sent = 0
        self._internal_errors = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the round in progress at its next step, then the thread; safe twice and without start()."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def reconfigure(self, config: CentralConfig) -> None:
        """Remote overrides of the rounds' timing, from the next round on (any thread)."""
        self._client.reconfigure(config)

    def stats(self) -> SyncStats:
        client = self._client
        return SyncStats(url=self._url, last_success=client.last_success, last_error=client.last_error,
                         rounds={outcome.value: self._rounds[outcome.value] for outcome in Outcome},
                         records_sent=self._sent, internal_errors=self._internal_errors,
                         actions_error=client.actions_error)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                result = self._round()
                self._rounds[result.outcome.value] += 1
                self._sent += result.sent
                if result.outcome is Outcome.SYNCED:
                    self._central.succeeded()
                else:
                    self._central.failed(result.error or result.outcome.value)
                self._stopping.wait(result.retry_after)
        finally:
            self._client.close()

    def _round(self) -> Round:
        try:
            return self._client.sync_once()
        except StoreError as exc:
            return Round(Outcome.RETRY, 0, 0, STORE_RETRY_S, str(exc))
        except Exception as exc:  # a bug: say it once with its traceback, count it, go on syncing
            self._internal_errors += 1
            log.exception("sync: a round failed unexpectedly; retrying in %.0f s", INTERNAL_RETRY_S)
            return Round(Outcome.RETRY, 0, 0, INTERNAL_RETRY_S, f"internal error: {exc!r}")

"""What the API holds of notifications: the configuration, the ingest's hook, the worker's task."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from central import episodes
from central.notify import outbox
from central.notify.config import NotifyConfig, NotifyConfigError, load
from central.notify.worker import Worker, utc_now
from central.settings import Settings, SettingsError

log = logging.getLogger("central.notify")


class Notifications:
    def __init__(self, config: NotifyConfig, clock: Callable[[], datetime] = utc_now) -> None:
        self.config, self.clock = config, clock
        self.worker: Worker | None = None
        self.background = True  # tests turn it off and drive worker.run_once on a fake clock
        self.restarts = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Notifications:
        """SettingsError listing every problem of PDM_CENTRAL_NOTIFY_CONFIG's file."""
        if settings.notify_config is None:
            return cls(NotifyConfig())
        try:
            return cls(load(settings.notify_config, production=settings.production))
        except NotifyConfigError as exc:
            raise SettingsError([f"PDM_CENTRAL_NOTIFY_CONFIG: {line}" for line in exc.problems]) from None

    async def after_store(self, conn: psycopg.AsyncConnection[Any], gateway_id: int, gateway: str,
                          event_ids: list[uuid.UUID]) -> int:
        """In the ingest transaction: the episodes of the newly stored events, and their deliveries (how many)."""
        now = self.clock()
        transitions = await episodes.apply(conn, gateway_id, gateway, event_ids, now)
        if not transitions or not self.config.routes:
            return 0
        return await outbox.enqueue(conn, self.config, transitions, now)

    def start(self, pool: AsyncConnectionPool[Any], interval_s: float = 1.0) -> None:
        if not self.config.routes:
            return
        self.worker = Worker(pool, self.config, self.clock, interval_s)
        if not self.background:
            return
        self._run()

    def _run(self) -> None:
        assert self.worker is not None
        self._task = asyncio.create_task(self.worker.run(), name="notification worker")
        self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        """The worker's loop survives failed rounds; should it die all the same (a bug), log it and start it again."""
        if task.cancelled() or self._stopping:
            return
        self.restarts += 1
        log.error("the notification worker stopped (restart %d): %s", self.restarts, task.exception(),
                  exc_info=task.exception())
        asyncio.get_running_loop().call_later(min(60.0, 2.0 ** self.restarts), self._run)

    def status(self) -> dict[str, Any]:
        """This process's worker, for the delivery log."""
        running = self._task is not None and not self._task.done()
        return {"running": running, "restarts": self.restarts, **(self.worker.status() if self.worker else {})}

    def wake(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


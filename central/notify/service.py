"""What the API holds of notifications: the configuration, the ingest's hook, the worker's task (none when
PDM_CENTRAL_NOTIFY_WORKER=off: then `pdm-central notify` processes deliver, central/notify/process.py)."""

from __future__ import annotations

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
from central.supervised import Supervised

log = logging.getLogger("central.notify")


class Notifications:
    def __init__(self, config: NotifyConfig, clock: Callable[[], datetime] = utc_now, inline: bool = True) -> None:
        self.config, self.clock, self.inline = config, clock, inline
        self.worker: Worker | None = None
        self.background = True  # tests turn it off and drive worker.run_once on a fake clock
        self._task: Supervised | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Notifications:
        """SettingsError listing every problem of PDM_CENTRAL_NOTIFY_CONFIG's file."""
        inline = settings.notify_worker == "inline"
        if settings.notify_config is None:
            return cls(NotifyConfig(), inline=inline)
        try:
            return cls(load(settings.notify_config, production=settings.production), inline=inline)
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
        """The worker, unless there is nothing to deliver or this process leaves it to `pdm-central notify`."""
        if not self.config.routes or not self.inline:
            return
        self.worker = Worker(pool, self.config, self.clock, interval_s)
        if self.background:
            self._task = Supervised("the notification worker", self.worker.run)
            self._task.start()

    def status(self) -> dict[str, Any]:
        """This process's worker, for the delivery log."""
        task = self._task
        return {"inline": self.inline, "running": task is not None and task.running,
                "restarts": task.restarts if task else 0,
                **(self.worker.status() if self.worker else {})}

    async def stop(self) -> None:
        if self._task is not None:
            await self._task.stop()
        if self.worker is not None:
            self.worker.close()


"""The lifespan's rollout task: `rollout.advance()` every PDM_CENTRAL_ROLLOUT_INTERVAL_S (0: no task).

A round that fails (the database down) is logged once per outage and tried again: the rollout waits meanwhile.
Several API workers may each run the task; the rollout's row lock makes each step happen once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from psycopg_pool import AsyncConnectionPool

from central.fleet import rollout
from central.supervised import Supervised
from web.logs import first_line

log = logging.getLogger("central.rollout")


class RolloutTask:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.failed_rounds = 0
        self._pool: AsyncConnectionPool[Any] | None = None
        self._task = Supervised("the rollout task", self._loop)

    def start(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        if self.interval_s > 0:
            self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    async def _loop(self) -> None:
        assert self._pool is not None
        while True:
            try:
                async with self._pool.connection() as conn:
                    await rollout.advance(conn)
                if self.failed_rounds:
                    log.info("rollouts advance again after %d failed round(s)", self.failed_rounds)
                self.failed_rounds = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (the database gone: the rollout waits, nothing is lost)
                self.failed_rounds += 1
                if self.failed_rounds == 1:
                    text = first_line(exc)
                    log.warning("rollout round failed, the rollout waits: %s", text)
            await asyncio.sleep(self.interval_s)

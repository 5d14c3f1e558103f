"""A background task that must keep running: the notification worker (in an API process or in `pdm-central
notify`), partition maintenance, the rollouts. Each loop survives its failed rounds; should it die all the same (a
bug), it is logged with its traceback, counted and started again after a backoff (2, 4, 8 s ... up to
`max_backoff_s`). stop() ends it for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("central")


class Supervised:
    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]], max_backoff_s: float = 60.0) -> None:
        self.name, self.max_backoff_s = name, max_backoff_s
        self.restarts = 0
        self._run = run
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)
        self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        if self._stopping:
            log.error("%s failed as it stopped: %s", self.name, task.exception(), exc_info=task.exception())
            return
        self.restarts += 1
        log.error("%s stopped (restart %d): %s", self.name, self.restarts, task.exception(),
                  exc_info=task.exception())
        asyncio.get_running_loop().call_later(min(self.max_backoff_s, 2.0 ** self.restarts), self._restart)

    def _restart(self) -> None:
        if not self._stopping:
            self.start()

    async def stop(self) -> None:
        """Cancel the loop and wait for its end; cancelled again each second should a cancel be swallowed (3.11's
        asyncio.wait_for can, when what it waits for ends at that moment): a stuck loop must not hang shutdown."""
        self._stopping = True
        task = self._task
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

"""The two threads of a driver whose I/O is asyncio (Modbus, OPC UA): the event loop the I/O runs on, and one sink
thread that hands batches to the pipeline. The pipeline's put blocks while it is full; on the sink thread that wait
holds back the next batch, never the loop's timers and connections."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sink: concurrent.futures.ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self.sink = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-sink")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=self.name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result (from any thread but the loop's own)."""
        if self.loop is None:
            raise RuntimeError(f"the {self.name} loop is not started")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def running(self) -> bool:
        return self.loop is not None and self.loop.is_running()

    def drain_sink(self) -> None:
        """Once this returns, a put in progress has returned: the sink thread runs one hand-off at a time."""
        if self.sink is not None:
            self.sink.submit(lambda: None).result()

    def close(self, last: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `last()` on the loop, stop it and join both threads; safe twice and without start()."""
        loop, thread, self.loop, self._thread = self.loop, self._thread, None, None
        if loop is not None:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(last(), loop).result()
                loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join()
            loop.close()
        if self.sink is not None:
            self.sink.shutdown(wait=True)
            self.sink = None

    def time(self) -> float:
        """The loop's clock (monotonic) while it runs, the same clock otherwise."""
        return self.loop.time() if self.loop is not None else time.monotonic()


def stop_server_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread | None,
                     first: Callable[[], Awaitable[None]], timeout_s: float = 10) -> None:
    """Stop a server's loop (the plant simulators'): run `first()` on it, cancel every task left, stop it, join its
    thread and close it, each wait bounded: a simulator that hangs must not hang the test or the demo stopping it."""

    async def shutdown() -> None:
        await first()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    if loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout_s)
        finally:
            loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join(timeout_s)
    loop.close()

"""What the Modbus and OPC UA plant simulators share: the plant served from a background thread with its own event
loop, stepped every `interval_s` of wall-clock time, started and stopped from any thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Self

from drivers.loop_thread import stop_server_loop
from drivers.simulator import Plant

LOOPBACK = "127.0.0.1"


def check_port(host: str, port: int) -> None:
    """Bind the address once and release it: OSError (EADDRINUSE) when another process has the port. The servers
    report a taken port only in their logs."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))


class PlantServer:
    """`start()` returns once the server listens (raises OSError when the port is taken); `stop()` is idempotent.
    `latest` holds the last values served per machine ({machine_id: {input: value}}), read under `lock`.
    A protocol's server implements `_serve()`, `_step(dt)` (the plant steps, the server serves the new values) and
    `_close()`."""

    thread_name = "plant-simulator"
    start_timeout_s = 10.0

    def __init__(self, plant: Plant, port: int, host: str = LOOPBACK, interval_s: float = 1.0) -> None:
        self.plant, self.host, self.port, self.interval_s = plant, host, port, interval_s
        self.lock = threading.Lock()
        self.latest: dict[str, dict[str, float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._stepper: asyncio.Task[None] | None = None

    async def _serve(self) -> None:
        raise NotImplementedError

    async def _step(self, dt: float) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=self.thread_name, daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), loop).result(self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    async def _start(self) -> None:
        check_port(self.host, self.port)
        await self._serve()
        self._stepper = asyncio.create_task(self._step_forever())

    async def _step_forever(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s - (time.monotonic() - last) % self.interval_s)
            now = time.monotonic()
            await self._step(now - last)
            last = now

    def stop(self) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            return

        async def first() -> None:
            if self._stepper is not None:
                self._stepper.cancel()
            if self._server is not None:
                await self._close()

        stop_server_loop(loop, thread, first)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

"""Modbus for tests and benchmarks: pymodbus servers on 127.0.0.1, and RTU servers on a serial line made of two
pseudo-terminals."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import select
import threading
from collections.abc import Iterable
from typing import Any, Self

from testkit.net import LOCALHOST, ServiceError, free_port


class ModbusUnit:
    """What one simulated Modbus device (one unit id) holds. Addresses not given are invalid: reading one gets
    exception 2 (IllegalAddress). Words may change while its server runs (`set`); the set of valid addresses is
    fixed when the server starts.

    `delay_s` makes it answer that late (a slow device; `math.inf`: not while it stays so). `requests` counts the
    read requests to valid addresses, `request_log` keeps (function code, address, count) of each, `max_in_flight`
    the most it was ever answering at once.
    """

    def __init__(self, holding: dict[int, int] | None = None, input: dict[int, int] | None = None) -> None:
        self.tables: dict[str, dict[int, int]] = {"holding": dict(holding or {}), "input": dict(input or {})}
        self.delay_s = 0.0
        self.requests = 0
        self.request_log: list[tuple[int, int, int]] = []
        self.in_flight = self.max_in_flight = 0

    def set(self, table: str, address: int, words: Iterable[int]) -> None:
        for i, word in enumerate(words):
            self.tables[table][address + i] = word

    def _simdevice(self, unit_id: int):
        from pymodbus.simulator import DataType, SimData, SimDevice

        def blocks(table: dict[int, int]) -> list:
            runs, start, values = [], None, []
            for address in sorted(table):
                if start is not None and address == start + len(values):
                    values.append(table[address])
                    continue
                if start is not None:
                    runs.append(SimData(start, values=values, datatype=DataType.REGISTERS))
                start, values = address, [table[address]]
            if start is not None:
                runs.append(SimData(start, values=values, datatype=DataType.REGISTERS))
            # pymodbus needs a block in every table: an invalid register where nothing is mapped.
            return runs or [SimData(65535, datatype=DataType.INVALID)]

        async def action(function_code, start_address, address, count, registers, set_values):
            self.requests += 1
            self.request_log.append((function_code, address, count))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                while self.delay_s == math.inf:
                    await asyncio.sleep(0.02)
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            finally:
                self.in_flight -= 1
            table = self.tables["holding" if function_code == 3 else "input"]
            for a in range(address, address + count):
                registers[a - start_address] = table.get(a, 0)

        bits = [SimData(0, values=False, datatype=DataType.BITS)]
        return SimDevice(unit_id, simdata=(bits, list(bits), blocks(self.tables["holding"]),
                                           blocks(self.tables["input"])), action=action)


class ModbusServers:
    """pymodbus servers on one event loop in a background thread: Modbus TCP servers on 127.0.0.1, RTU servers on
    serial lines, and a "closer" that accepts a connection, reads a request and closes it.

        with ModbusServers() as servers:
            port = servers.tcp({1: ModbusUnit(holding={0: 1234})})
            servers.stop(port)       # the device is switched off: its connections close, the port refuses
            servers.tcp(units, port)  # ... and on again, on the same port

    `rtu(units)` returns the path a client opens: a pseudo-terminal joined to the server's by a thread that copies
    bytes both ways (a null-modem cable, without baud-rate timing). Needs pyserial. Linux pseudo-terminals refuse
    parity (termios EINVAL): the line is 8N1 or 8N2, so clients must use parity "N".
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="modbus-servers", daemon=True)
        self._thread.start()
        self._servers: dict[int | str, Any] = {}
        self._lines: list[_PtyLine] = []

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def tcp(self, units: dict[int, ModbusUnit], port: int | None = None) -> int:
        """Start a Modbus TCP server for these unit ids; return its port."""
        from pymodbus.server import ModbusTcpServer

        port = port or free_port()

        async def start():
            server = ModbusTcpServer([unit._simdevice(uid) for uid, unit in units.items()],
                                     address=(LOCALHOST, port))
            await server.serve_forever(background=True)
            return server

        if port in self._servers:
            raise ServiceError(f"a server already runs on port {port}")
        try:
            self._servers[port] = self._call(start())
        except RuntimeError as exc:
            raise ServiceError(f"cannot start a Modbus server on port {port}: {exc}") from exc
        return port

    def connections(self, port: int) -> int:
        """The client connections the Modbus TCP server on `port` has open now."""

        async def count():
            return len(self._servers[port].active_connections)

        return self._call(count())

    def closer(self, port: int | None = None) -> int:
        """A TCP server that accepts, reads the first bytes of a request and closes the connection; return its port."""
        port = port or free_port()

        async def start():
            async def handle(reader, writer):
                with contextlib.suppress(OSError):
                    await reader.read(1)
                writer.close()

            return await asyncio.start_server(handle, LOCALHOST, port, reuse_address=True)

        self._servers[port] = self._call(start())
        return port

    def stop(self, port: int) -> None:
        """Stop the server on `port` and close its connections."""
        server = self._servers.pop(port, None)

        async def stop():
            if isinstance(server, asyncio.Server):
                server.close()  # its connections close themselves after one request
                await asyncio.wait_for(server.wait_closed(), 5)
            else:
                await server.shutdown()

        if server is not None:
            self._call(stop())

    def rtu(self, units: dict[int, ModbusUnit], baudrate: int = 19200, stopbits: int = 1) -> str:
        """Start an RTU server for these unit ids on a new serial line; return the path of the line's other end."""
        from pymodbus.server import ModbusSerialServer

        line = _PtyLine()
        self._lines.append(line)

        async def start():
            server = ModbusSerialServer([unit._simdevice(uid) for uid, unit in units.items()], port=line.server_path,
                                        baudrate=baudrate, parity="N", stopbits=stopbits)
            await server.serve_forever(background=True)
            return server

        self._servers[line.client_path] = self._call(start())
        return line.client_path

    def close(self) -> None:
        for key in list(self._servers):
            with contextlib.suppress(Exception):
                self.stop(key)

        async def cancel_the_rest():  # requests a silent unit still holds
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(cancel_the_rest())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        for line in self._lines:
            line.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _PtyLine:
    """Two pseudo-terminals joined by a thread copying bytes between their master sides: the server opens one
    slave path, the client the other, as two ends of a serial cable."""

    def __init__(self) -> None:
        import tty

        self._fds = []
        self._masters = []
        paths = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)
            self._masters.append(master)
            self._fds += [master, slave]  # the slave stays open here, or the master reads EIO while nobody has it
            paths.append(os.ttyname(slave))
        self.server_path, self.client_path = paths
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._copy, name="pty-line", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        a, b = self._masters
        while True:
            ready, _, _ = select.select([a, b, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                    os.write(b if fd == a else a, data)
                except OSError:  # the other side not open yet, or closing
                    pass

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        for fd in (*self._fds, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

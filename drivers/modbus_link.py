"""The Modbus link: one connection (a TCP host:port, or a serial line) carrying one request at a time, and the
errors a request on it can end with.

    ModbusLinkError
    ├── ConnectFailed       the connection or the serial port could not be opened (refused, unreachable, no such
    │                       port, or a port that refuses its settings)
    ├── RequestTimeout      no answer within timeout_s
    ├── ConnectionLost      the device closed the connection during the request (or sent garbage)
    └── DeviceException     the device answered with a Modbus exception response (`code`, `code_name`)

Anything pymodbus or pyserial raises is mapped to one of these at the boundary (`Link`), so that callers (the
driver, `pdm-edge modbus probe`) see a ModbusLinkError with a plain message, never a library's own exception.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymodbus.client import ModbusBaseClient


def frame_pause_s(baudrate: int) -> float:
    """The Modbus RTU inter-frame silence: 3.5 characters of 11 bits, 1.75 ms above 19200 baud."""
    return 3.5 * 11 / baudrate if baudrate <= 19200 else 0.00175


# --- the link: one connection, one request at a time ------------------------------------------------------------

EXCEPTION_NAMES = {
    1: "IllegalFunction", 2: "IllegalAddress", 3: "IllegalValue", 4: "DeviceFailure", 5: "Acknowledge",
    6: "DeviceBusy", 7: "NegativeAcknowledge", 8: "MemoryParityError", 10: "GatewayPathUnavailable",
    11: "GatewayTargetNoResponse",
}
_EXCEPTION_HINTS = {
    1: "the device does not read this table with this function; try the other table (holding / input)",
    2: "the device has no register at some address of the request: check address, table and type "
       "(a request merged over a gap also covers the unmapped registers in between: lower largest_gap)",
    3: "the device refused the request's size: check the type and lower largest_gap",
    4: "the device reported an internal failure",
}
RETRYABLE_EXCEPTIONS = {5, 6}  # the device is busy: the same request may succeed a moment later
GATEWAY_EXCEPTIONS = {10, 11}  # a gateway answered for the device: the device itself is not answering


class ModbusLinkError(Exception):
    """A request on a link failed; the subclass says how."""


class ConnectFailed(ModbusLinkError):
    pass


class RequestTimeout(ModbusLinkError):
    pass


class ConnectionLost(ModbusLinkError):
    pass


class DeviceException(ModbusLinkError):
    def __init__(self, code: int) -> None:
        self.code = code
        self.code_name = EXCEPTION_NAMES.get(code, f"Code{code}")
        super().__init__(f"exception {code} ({self.code_name})")

    @property
    def key(self) -> str:
        """The name as a status key: illegal_address, device_busy, code_12."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", self.code_name).lower()

    @property
    def hint(self) -> str:
        return _EXCEPTION_HINTS.get(self.code, "")


class ModbusSetupError(ValueError):
    """The driver cannot run with this configuration on this machine."""


def quiet_library() -> None:
    # pymodbus logs every failed connect and every lost frame at WARNING/ERROR. We log state changes and count the
    # rest, so its own lines would repeat ours once per attempt. An operator who set its level keeps it.
    library = logging.getLogger("pymodbus")
    if library.level == logging.NOTSET:
        library.setLevel(logging.CRITICAL)


class Link:
    """One Modbus connection: a TCP host and port, or a serial line, shared by the devices behind it (unit ids).

    `read()` runs on the event loop that created the link. Requests never overlap (an asyncio.Lock) and a serial
    line stays silent for `pause_s` between a response and the next request. The connection is opened on the first
    request and after it is lost; pymodbus's own retries and reconnection are off: each caller decides.
    """

    def __init__(self, name: str, make_client: Callable[[Callable[[bool], None]], ModbusBaseClient], *, serial: bool,
                 pause_s: float = 0.0) -> None:
        self.name = name  # e.g. "10.0.0.5:502" or "/dev/ttyUSB0"
        self.serial = serial
        self.pause_s = pause_s
        self._make_client = make_client  # (trace_connect callback) -> an unconnected pymodbus async client
        self._client: ModbusBaseClient | None = None
        self._waiting: asyncio.Task[Any] | None = None  # the task awaiting a request's answer, cancelled if the
        self._cut = False  # connection is lost meanwhile (then _cut is set) or at its deadline (then _expired is)
        self._expired = False
        self._deadline = 0.0  # loop time by which the request in progress must be answered
        self._timer: asyncio.TimerHandle | None = None  # due at a deadline, or before it: see _watch
        self._lock = asyncio.Lock()
        self._quiet_until = 0.0

    @classmethod
    def tcp(cls, host: str, port: int, max_timeout_s: float) -> Link:
        from pymodbus.client import AsyncModbusTcpClient

        return cls(f"{host}:{port}", lambda trace: AsyncModbusTcpClient(
            host, port=port, timeout=max_timeout_s + 1, retries=0, reconnect_delay=0, trace_connect=trace,
            name=f"{host}:{port}"), serial=False)

    @classmethod
    def rtu(cls, serial_port: str, baudrate: int, parity: str, stopbits: int, max_timeout_s: float,
            pause_s: float | None = None) -> Link:
        if importlib.util.find_spec("serial") is None:
            raise ModbusSetupError(f"Modbus RTU on {serial_port} needs pyserial: pip install 'pymodbus[serial]'")
        from pymodbus.client import AsyncModbusSerialClient

        return cls(serial_port, lambda trace: AsyncModbusSerialClient(
            serial_port, baudrate=baudrate, parity=parity, stopbits=stopbits, bytesize=8, timeout=max_timeout_s + 1,
            retries=0, reconnect_delay=0, trace_connect=trace, name=serial_port),
            serial=True, pause_s=frame_pause_s(baudrate) if pause_s is None else pause_s)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def open(self, timeout: float) -> None:
        """Connect now rather than at the first request, so that the first poll is on time; a failure is left for
        that request to meet and report."""
        async with self._lock:
            try:
                await self._connected(timeout)
            except ModbusLinkError:
                pass

    async def read(self, table: str, address: int, count: int, unit_id: int, timeout: float) -> list[int]:
        """`count` registers of `table` from `address`. Raises a ModbusLinkError."""
        return (await self.read_timed(table, address, count, unit_id, timeout))[0]

    async def read_timed(self, table: str, address: int, count: int, unit_id: int,
                         timeout: float) -> tuple[list[int], float]:
        """read(), and the loop time at which the request was sent (after waiting for the line and connecting)."""
        async with self._lock:
            if not self.pause_s:
                response, sent = await self._request(table, address, count, unit_id, timeout)
            else:
                response, sent = await self._request_after_pause(table, address, count, unit_id, timeout)
        if response.isError():
            raise DeviceException(int(getattr(response, "exception_code", 0)))
        registers = response.registers
        if len(registers) < count:
            raise ConnectionLost(f"the device sent {len(registers)} registers instead of {count}")
        return registers[:count], sent

    async def _request_after_pause(self, table: str, address: int, count: int, unit_id: int,
                                   timeout: float) -> tuple[Any, float]:
        """_request once the line has been silent for pause_s since the last response (a serial line)."""
        loop = asyncio.get_running_loop()
        delay = self._quiet_until - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            return await self._request(table, address, count, unit_id, timeout)
        finally:
            self._quiet_until = loop.time() + self.pause_s

    async def _request(self, table: str, address: int, count: int, unit_id: int,
                       timeout: float) -> tuple[Any, float]:
        """The request, awaited in the caller's task (no task of its own): a timeout or the connection's loss
        cancels the await."""
        client = self._client
        if client is None or not client.connected:
            client = await self._connected(timeout)
        method = client.read_holding_registers if table == "holding" else client.read_input_registers
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Link.read runs in a task")
        sent = self._watch(task, timeout)
        cancelling = task.cancelling()
        try:
            response = await method(address, count=count, device_id=unit_id)
            if task.cancelling() > cancelling:
                # Python 3.11's wait_for (pymodbus awaits the answer with it) returns the answer and drops a
                # cancellation that came in the same instant: raised here, as the caller asked.
                raise asyncio.CancelledError
        except asyncio.CancelledError:
            if not (self._cut or self._expired) or task.uncancel() > 0:  # cancelled by the caller (a stop)
                raise
            if self._cut or not self.serial:
                # After a timeout: a late answer on this connection could be taken for the next request's, and a
                # device that rebooted leaves a connection that never answers again. A fresh connection clears both.
                self.close()
            if self._cut:
                raise ConnectionLost("the connection was closed during the request") from None
            raise RequestTimeout(f"no answer within {timeout:g} s") from None
        except Exception as exc:  # pymodbus: not connected, wrong transaction id, a frame it cannot parse
            self.close()
            raise ConnectionLost(f"bad response: {exc}") from exc
        finally:
            self._waiting = None
        return response, sent

    def _watch(self, task: asyncio.Task[Any], timeout: float) -> float:
        """Make `task` the one awaiting an answer, cancelled (`_expired`) if none comes within `timeout`; returns the
        loop time, when the request is sent. One timer per link, moved on only when it fires before the deadline
        of the request then in progress: requests answered within milliseconds do not each create and cancel a
        timer (asyncio.timeout per request was a tenth of the driver's CPU per reading)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._waiting, self._cut, self._expired = task, False, False
        self._deadline = now + timeout
        if self._timer is not None and self._timer.when() > self._deadline:  # a longer timeout's: too late
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._check_deadline, self._deadline)
        return now

    def _check_deadline(self, due: float) -> None:
        self._timer = None
        waiting = self._waiting
        if waiting is None or self._cut or self._expired:
            return
        if self._deadline > due:  # a later request's deadline
            self._timer = asyncio.get_running_loop().call_at(self._deadline, self._check_deadline, self._deadline)
            return
        self._expired = True
        waiting.cancel()

    async def _connected(self, timeout: float) -> ModbusBaseClient:
        if self._client is not None and self._client.connected:
            return self._client
        self.close()

        def trace(connected: bool) -> None:
            waiting = self._waiting
            if not connected and waiting is not None and not (self._cut or self._expired) and self._client is client:
                self._cut = True
                waiting.cancel()

        client = self._make_client(trace)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a stop's cancel
                ok = await client.connect()
        except TimeoutError:
            ok, why = False, f"no answer to the connection within {timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - pyserial raises termios.error (no OSError) for refused settings
            ok, why = False, self._refused_why(exc)
        else:
            why = "no such serial port, or it is in use or not permitted" if self.serial \
                else "connection refused or unreachable"
        if not ok:
            client.close()
            raise ConnectFailed(f"cannot open {self.name}: {why}")
        self._client = client
        return client

    def _refused_why(self, exc: Exception) -> str:
        reason = exc.args[1] if len(exc.args) == 2 and isinstance(exc.args[1], str) else str(exc)  # (errno, text)
        reason = reason or "refused"
        if self.serial:
            return f"the port refused its settings ({reason}): check baudrate, parity and stop bits"
        return reason

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

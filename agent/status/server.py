"""The status API's server: uvicorn in a background thread (`StatusServer`), on a socket bound here, serving the
app it makes at the first request that needs it (`OnFirstUse`)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from agent.config import StatusConfig
from agent.http_server import ConnectionLimits, limited_h11
from agent.snapshot import Parts, snapshot
from agent.status.guard import Guard

log = logging.getLogger("agent.status")

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


# What the app's /healthz answers (models.Health(status="ok") as FastAPI encodes it): a test holds them equal.
HEALTHY = {"status": "ok", "checks": {}}


class OnFirstUse:
    """The status API's ASGI app, made by `make` at the first request that needs it, then kept.

    FastAPI, the routes and their response models are about 15 MB of the agent's memory (BENCHMARKS.md, startup):
    a gateway nobody looks at does not pay them; once the page, `pdm-edge status` or a Prometheus scrape asked for
    anything, they stay, as they did when made at start-up. Until then GET and HEAD /healthz (a container's
    liveness probe) are answered here, behind the same guard, with the same body and headers as the app's.
    The first request waits for the app (a few hundred ms, once). Called only on the server's event loop thread,
    so it is made once."""

    def __init__(self, make: Callable[[], ASGIApp], status: StatusConfig) -> None:
        self._make = make
        self._app: ASGIApp | None = None
        self._failure: Exception | None = None
        token = status.token.get_secret_value() if status.token else None
        self._light = Guard(self._healthz, token=token, bind_host=status.host, cors=bool(status.cors_origins))

    @property
    def loaded(self) -> bool:
        return self._app is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._app
        if app is None:
            if scope["type"] == "http" and scope["path"] == "/healthz" and scope["method"] in ("GET", "HEAD"):
                return await self._light(scope, receive, send)
            try:
                app = self._app = self._make()
            except Exception as exc:  # noqa: BLE001 - a bug: the guard logs it, answers a JSON 500 with its headers
                self._failure = exc
                return await self._light(scope, receive, send)
        await app(scope, receive, send)

    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/healthz":  # only when making the app failed just now
            raise RuntimeError("the status API's app could not be made") from self._failure
        await JSONResponse(HEALTHY)(scope, receive, send)


class StatusServer:
    """The status API in a background thread: `start()` returns once it listens, `stop()` ends it.

    Who calls it: the agent, from its main thread: start() after the pipeline started, stop() first thing when it
    stops (before the store closes). `stop()` is safe twice and without `start()`. `port=0` (tests) listens on a
    free port: `url` tells which. Every request reads a fresh `snapshot(agent)`."""

    def __init__(self, agent: Parts, host: str | None = None, port: int | None = None) -> None:
        self.agent = agent
        self.host = host if host is not None else agent.config.status.host
        self.port = port if port is not None else agent.config.status.port
        self._server: _Uvicorn | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.app: OnFirstUse | None = None
        self.limits = ConnectionLimits()  # per address and per request (agent/http_server.py)
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Raises OSError when the address cannot be bound (in use, not this machine's), RuntimeError when the
        server does not come up."""
        if self._thread is not None:
            return
        # Bound here, not by uvicorn: a bind error reaches the caller (uvicorn would sys.exit its thread).
        agent = self.agent
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        status = agent.config.status

        def make() -> ASGIApp:
            from agent.status.routes import create_app  # FastAPI: loaded at the first use (OnFirstUse)

            return create_app(lambda: snapshot(agent), status)

        self.app = OnFirstUse(make, status)
        config = uvicorn.Config(
            self.app, log_config=None, log_level="warning",
            access_log=False, lifespan="off",
            http=limited_h11(self.limits), ws="none", loop="asyncio", server_header=False, proxy_headers=False,
            limit_concurrency=64, timeout_keep_alive=15, timeout_graceful_shutdown=int(STOP_TIMEOUT_S),
        )
        server = _Uvicorn(config)

        def serve() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException:  # SystemExit included: uvicorn exits on a failed startup
                log.exception("the status API stopped")
            finally:
                server.listening.set()  # wake start() if it failed before listening

        self._server, self._socket = server, sock
        self._thread = threading.Thread(target=serve, name="status-api", daemon=True)
        self._thread.start()
        if not server.listening.wait(START_TIMEOUT_S) or not server.started:
            self.stop()
            raise RuntimeError(f"the status API did not start on {self.url}")
        log.info("status API on %s%s", self.url, "" if self.agent.config.status.token else " (no token: loopback only)")

    def stop(self) -> None:
        """Stop accepting, finish the requests in flight (up to STOP_TIMEOUT_S), close connections."""
        thread, server = self._thread, self._server
        if thread is None or server is None:
            return
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S + 2)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT_S)
        if self._socket is not None:
            self._socket.close()
        self._thread = self._server = self._socket = None


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
        sock.set_inheritable(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"the status API cannot listen on {host}:{port}: {exc.strerror}; "
                                 "set status.bind to a free address") from exc
    return sock

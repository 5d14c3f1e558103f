"""Running the app: uvicorn in one process for development (`pdm-central serve`), gunicorn with uvicorn workers for
production (`gunicorn -c python:central.gunicorn_conf`).

Both servers' own X-Forwarded-* handling is off: the app trusts forwarded headers from PDM_CENTRAL_TRUSTED_PROXIES
only (central/app.py), whichever server runs it. Neither sends a Server header.
"""

from __future__ import annotations

import gc
import signal
from typing import ClassVar

import uvicorn
from uvicorn_worker import UvicornWorker

from central.app import create_app
from central.settings import Settings

# uvicorn's C event loop and HTTP parser, asked for by name (the central extra brings both): "auto" would fall back to
# asyncio's loop and the pure-Python h11 without a word when they are missing, and an ingest would cost the API about
# a fifth more CPU (issue 21, central_scale: 92 -> 76 us per summary).
LOOP, HTTP = "uvloop", "httptools"


class Worker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no type hints
    """gunicorn's worker class for pdm-central (see central/gunicorn_conf.py)."""

    CONFIG_KWARGS: ClassVar[dict[str, object]] = {"loop": LOOP, "http": HTTP, "proxy_headers": False,
                                                  "server_header": False}


GEN0 = 20_000


def settle_heap() -> None:
    """Once the app is built, in each serving process: its long-lived objects (the app, its routes, pydantic's
    schemas, imported modules) leave the garbage collector's generations, so the collections an ingest's thousands of
    short-lived objects trigger no longer traverse them (API CPU per summary ingested: about 48 -> 37 us), and the
    youngest generation is collected every GEN0 allocations instead of 700 (a batch of 100 summaries makes about
    1,500)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0, *gc.get_threshold()[1:])


def _stopped(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve in the foreground until SIGINT/SIGTERM, then return (exit status 0) after a graceful shutdown;
    SettingsError when production mode refuses the settings."""
    default_host, default_port = settings.host_port
    host, port = host or default_host, port or default_port
    # --host/--port replace PDM_CENTRAL_BIND: the checks and the start-up log see where it really listens.
    settings = settings.model_copy(update={"bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"})
    app = create_app(settings)
    settle_heap()
    # uvicorn handles the signal (graceful shutdown), then raises it again against the handlers it found: ours turn
    # it into a normal exit instead of death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopped)
    uvicorn.run(app, host=host, port=port, loop=LOOP, http=HTTP, proxy_headers=False, server_header=False,
                log_config=None, timeout_graceful_shutdown=10)

"""`pdm-central notify`: the delivery worker in a process of its own, the production shape (DEPLOYMENT.md): the API
processes run with PDM_CENTRAL_NOTIFY_WORKER=off, so that rendering and sending never take the ingest's GIL, and one
notifier process delivers what their ingests write to the outbox.

Same settings as the API (PDM_CENTRAL_ variables, the notification config), same logs (PDM_CENTRAL_LOG_LEVEL and
_FORMAT). Several may run: they share the outbox through its leases (central/notify/outbox.py), as the API's inline
workers do. SIGTERM or SIGINT: the round in flight is cancelled and the process exits 0; a delivery cut short stays
pending and is sent again once its lease ends (at least once on the wire, once in effect by its delivery id).
Should the process die (kill -9, a crash), nothing is lost either: the outbox is in PostgreSQL, and systemd or
Compose start it again. While PostgreSQL is down the worker logs and counts failed rounds and goes on.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from central import __version__, db
from central.notify.service import Notifications
from central.notify.worker import Worker
from central.settings import Settings
from central.supervised import Supervised

log = logging.getLogger("central.notify")
POOL_NAME = "pdm-central-notify"
POOL_MAX_SIZE = 4  # a round holds one connection at a time; the rest is headroom for a slow one


async def run(settings: Settings, stop: asyncio.Event | None = None, interval_s: float = 1.0) -> None:
    """Deliver until `stop` is set, or SIGTERM/SIGINT when `stop` is None; SettingsError for an unusable
    notification config (before anything starts)."""
    config = Notifications.from_settings(settings).config
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    if not config.routes:
        log.warning("pdm-central notify: no notification routes (PDM_CENTRAL_NOTIFY_CONFIG): nothing to deliver")
        await stop.wait()
        return
    pool = db.make_pool(settings.model_copy(update={"pool_max_size": min(settings.pool_max_size, POOL_MAX_SIZE),
                                                    "pool_min_size": min(settings.pool_min_size, 1)}),
                        name=POOL_NAME)
    await pool.open(wait=False)
    worker = Worker(pool, config, interval_s=interval_s)
    task = Supervised("the notification worker", worker.run)
    task.start()
    log.info("pdm-central %s notify: delivering for %d route(s) over %d channel(s)", __version__,
             len(config.routes), len(config.channels), extra={"settings": settings.redacted()})
    try:
        await stop.wait()
        log.info("pdm-central notify stopping")
    finally:
        await task.stop()
        worker.close()
        await pool.close()
    log.info("pdm-central notify stopped: %s", worker.status())

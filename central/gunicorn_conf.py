"""gunicorn settings for production: `gunicorn -c python:central.gunicorn_conf` (nothing else on the command line).

Everything comes from the PDM_CENTRAL_ variables (central/settings.py): bind (PDM_CENTRAL_BIND), worker processes
(PDM_CENTRAL_WORKERS). gunicorn refuses to start, printing every problem, when the settings are invalid or, in
production mode, unsafe. Each worker has its own pool: at most WORKERS x POOL_MAX_SIZE connections to PostgreSQL.
TLS is terminated by the reverse proxy in front (nginx); set PDM_CENTRAL_TRUSTED_PROXIES to its address.
"""

import sys
from typing import Any, NoReturn

from central.server import settle_heap
from central.settings import Settings, SettingsError, load_settings
from web import logs


def _refuse(problems: list[str]) -> NoReturn:
    print(f"pdm-central: {len(problems)} settings problem(s):", *(f"  {p}" for p in problems), sep="\n",
          file=sys.stderr)
    sys.exit(2)


def _load() -> Settings:
    """The settings, or exit 2 printing every problem."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        _refuse(exc.problems)
    problems = settings.serving_problems()
    if problems:
        _refuse(problems)
    return settings


_settings = _load()

wsgi_app = "central.app:create_app()"
worker_class = "central.server.Worker"
bind = [_settings.bind]
workers = _settings.workers
timeout = 60  # a worker silent for this long is restarted
graceful_timeout = 30  # SIGTERM: finish the requests in flight
keepalive = 5
# Request line and headers: gunicorn's defaults, stated; the body limit is the app's (PDM_CENTRAL_MAX_BODY_BYTES).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()


def post_worker_init(worker: object) -> None:
    """Each worker logs the app's records as `pdm-central serve` does (PDM_CENTRAL_LOG_LEVEL, PDM_CENTRAL_LOG_FORMAT:
    JSON lines off a terminal); gunicorn's own error and access logs keep their handlers (they do not propagate)."""
    logs.setup(_settings.log_level, _settings.log_format)
    settle_heap()


def when_ready(server: Any) -> None:  # gunicorn.arbiter.Arbiter
    """One line at start: how many connections this instance may open (each worker has its own pool)."""
    replica = _settings.read_database_url is not None
    server.log.info("%d workers x up to %d PostgreSQL connections each: at most %d on the primary%s", workers,
                    _settings.pool_max_size, workers * _settings.pool_max_size,
                    f" and {workers * _settings.pool_max_size} on the read replica" if replica else "")
    if _settings.notify_config is not None:
        server.log.info("notifications delivered by %s", "each worker (PDM_CENTRAL_NOTIFY_WORKER=inline)"
                        if _settings.notify_worker == "inline" else "`pdm-central notify` processes, not the workers")

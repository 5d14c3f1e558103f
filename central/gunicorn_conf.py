"""gunicorn settings for production: `gunicorn -c python:central.gunicorn_conf` (nothing else on the command line).

Everything comes from the PDM_CENTRAL_ variables (central/settings.py): bind (PDM_CENTRAL_BIND), worker processes
(PDM_CENTRAL_WORKERS). gunicorn refuses to start, printing every problem, when the settings are invalid or, in
production mode, unsafe. Each worker has its own pool: at most WORKERS x POOL_MAX_SIZE connections to PostgreSQL.
TLS is terminated by the reverse proxy in front (nginx); set PDM_CENTRAL_TRUSTED_PROXIES to its address.
"""

import sys

from central.settings import SettingsError, load_settings

try:
    _settings = load_settings()
    _problems = _settings.serving_problems()
except SettingsError as exc:
    _settings, _problems = None, exc.problems
if _problems:
    print(f"pdm-central: {len(_problems)} settings problem(s):", *(f"  {p}" for p in _problems), sep="\n",
          file=sys.stderr)
    sys.exit(2)

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
